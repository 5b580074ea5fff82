"""Folding trained probabilistic gates into their producers, so a trained model carries no gate.

A gate sits right after its producer's last per-channel parameters (`Gate.fold`): multiplying the
output by the eval graph's 0/1 mask (logit > 0) equals scaling those slices by it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.errors import OptionError
from onnx_morph.rewrite.training.regularizer import Gate


def gate_masks(gates: tuple[Gate, ...] | list[Gate], params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The eval graph's mask of every gate, from its stored parameter: 1 where its logit is positive."""
    return {g.param: (g.logits(params[g.param]) > 0).astype(np.float32) for g in gates}


def fold_gates(model: onnx.ModelProto, gates: tuple[Gate, ...] | list[Gate],
               params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """In place: scale every gate's fold slices by its deterministic mask (`params`: the trained,
    stored gate parameters)."""
    by_name = {t.name: t for t in model.graph.initializer}
    masks = gate_masks(gates, params)
    for gate in gates:
        mask = masks[gate.param]
        for param, axis in gate.fold:
            if param not in by_name:
                raise OptionError(f"gate on '{gate.tensor}' (node '{gate.node}'): the model has no initializer '{param}'")
            value = numpy_helper.to_array(by_name[param])
            shape = [1] * value.ndim
            shape[axis] = gate.channels
            folded = (value * mask.reshape(shape)).astype(value.dtype)
            by_name[param].CopyFrom(numpy_helper.from_array(folded, param))
    return model
