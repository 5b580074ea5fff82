"""BatchNorm statistics re-measured on data: after pruning, a removed channel's constant that could
not be folded (it fed a padded Conv) shifts the next BatchNorm's input, and re-measuring the
statistics absorbs that shift; after training, the running statistics are the measured ones."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.errors import OptionError
from onnx_morph.handlers import handler_for
from onnx_morph.rewrite.editing import Names, drop_unused
from onnx_morph.rewrite.surgery.verify import onnxruntime, reference_options


def _with_statistics(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes keeping running statistics (BatchNorm: BaseHandler.running_statistics)."""
    return [n for n in model.graph.node if handler_for(n.op_type, n.domain).running_statistics is not None]


def has_batchnorm(model: onnx.ModelProto) -> bool:
    return bool(_with_statistics(model))


def recalibrated_batchnorm(model: onnx.ModelProto, inputs: list[np.ndarray], input_name: str) -> onnx.ModelProto:
    """Set every BatchNorm's running mean and variance to its input's statistics over `inputs`,
    measured with every BatchNorm normalizing by batch statistics, as in training."""
    from onnx_morph.rewrite.training.training_graph import trainable  # off prune's start-up path

    norms = _with_statistics(model)
    if not norms or not inputs:
        return model
    probe = trainable(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None)
                              for n in norms if n.input[0] not in known)
    ort = onnxruntime()
    # No graph rewrites: onnxruntime 1.19's optimizations treat a training-mode BatchNormalization whose statistics
    # are initializers as an inference one (normalized by the running statistics), so the measured
    # statistics downstream of it would be wrong.
    session = ort.InferenceSession(probe.SerializeToString(), reference_options(ort), providers=["CPUExecutionProvider"])
    wanted = [n.input[0] for n in norms]
    sums: dict[str, list] = {}
    for x in inputs:
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {input_name: x})))
        for name in wanted:
            v = values[name].astype(np.float64)
            axes = tuple(a for a in range(v.ndim) if a != 1)
            s = sums.setdefault(name, [np.zeros(v.shape[1]), np.zeros(v.shape[1]), 0])
            s[0] += v.sum(axis=axes)
            s[1] += (v * v).sum(axis=axes)
            s[2] += v.size // v.shape[1]
    names = Names(model.graph)
    for index, node in enumerate(norms):
        total, squares, count = sums[node.input[0]]
        mean = total / count
        variance = np.maximum(squares / count - mean * mean, 0.0)
        # Exporters feed the statistics through Identity nodes of shared tensors: give each BN its own.
        slots = handler_for(node.op_type, node.domain).running_statistics
        for slot, label, value in zip(slots, ("running_mean", "running_var"), (mean, variance)):
            name = names.fresh(f"{node.name or f'batchnorm_{index}'}/{label}")
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            node.input[slot] = name
    drop_unused(model.graph)  # the Identity nodes and initializers that fed the replaced statistics
    return model


def calibrated(model: onnx.ModelProto, batches: Sequence[np.ndarray]) -> onnx.ModelProto:
    """`recalibrated_batchnorm` for a model with one data input, which every batch feeds (re-cut to
    the input's batch size when that is fixed); a batch whose sample shape the input does not
    accept is an error naming both shapes."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OptionError(f"calibration feeds one input, and the model has {len(inputs)}: {[i.name for i in inputs]}")
    elem_type = inputs[0].type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        raise OptionError(f"calibration feeds float32 batches, and input '{inputs[0].name}' takes "
                          f"{onnx.helper.tensor_dtype_to_np_dtype(elem_type)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    batches = [np.asarray(b, dtype=np.float32) for b in batches]
    for batch in batches:
        fits = batch.ndim == len(dims) and all(d is None or d == n for d, n in zip(dims[1:], batch.shape[1:]))
        if dims and not fits:
            raise OptionError(f"calibration batch of shape {list(batch.shape)} does not fit input "
                              f"'{inputs[0].name}' of shape {[d if d is not None else '?' for d in dims]}")
    if dims and dims[0]:  # a fixed batch size: feed the data in batches of that size
        batches = [b[i:i + dims[0]] for b in batches for i in range(0, len(b) - dims[0] + 1, dims[0])]
    return recalibrated_batchnorm(model, batches, inputs[0].name)
