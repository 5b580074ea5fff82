"""Quantization: QuantizeLinear / DequantizeLinear around activations and weights (QDQ models).

On an activation they keep every channel where it is (a per-channel scale and zero point follow
their channels); on a weight, DequantizeLinear lays the stored integers out again as floats, so a
Conv or MatMul reading it is sliced at the integer initializer, together with its per-channel
scales and zero points."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_morph.handlers.base import BaseHandler, NodeView, Relation, TensorInfo, describe, normalize_axis
from onnx_morph.handlers.passthrough import pass_through


def per_channel_axis(view: NodeView, tensor: TensorInfo | None) -> int | None:
    """The axis of `tensor` (input 0) that the node's scale and zero point run along, or None when
    they are one value for the whole tensor."""
    scale = view.input(1)
    if tensor is None or tensor.shape is None or scale is None or scale.shape is None:
        return None
    if len(scale.shape) != 1 or scale.shape[0] <= 1:
        return None
    return normalize_axis(int(view.attr("axis", 1)), len(tensor.shape))


class QuantizeLinear(BaseHandler):
    """QuantizeLinear and DequantizeLinear: elementwise per channel, the scale and zero point
    (inputs 1 and 2) indexed by the channel when they are per-channel."""

    follows_ties = True
    stored_as_output = True

    def relate(self, view: NodeView) -> Relation:
        x = view.input(0)
        if x is None or x.axes is None or x.constant:
            return Relation([None] * len(view.outputs))
        if int(view.attr("block_size", 0) or 0):
            return pass_through(view, f"{describe(view)} quantizes in blocks")
        axis = per_channel_axis(view, x)
        if axis is None:
            return pass_through(view)
        if x.axes != (axis,):
            return pass_through(view, f"{describe(view)} has per-channel scales on axis {axis}, "
                                      f"the channels are on axes {list(x.axes)}")
        if any(t is not None and t.computed for t in view.inputs[1:]):
            return pass_through(view, f"{describe(view)} has per-channel scales computed at run time")
        return pass_through(view)

    def prune(self, view: NodeView, edit) -> None:
        x = view.input(0)
        if x is None or x.constant or per_channel_axis(view, x) is None:
            return
        keep = edit.keep(x.name)
        if keep is not None:
            self._slice_scales(view, edit, keep)

    def source_axis(self, view: NodeView, axis: int) -> tuple[int, int]:
        """A dequantized weight is its integer initializer laid out again, axis for axis."""
        return 0, axis

    def slice_source(self, view: NodeView, edit, index: int, axis: int, copies) -> None:
        edit.slice_input(index, axis, copies)
        if index == 0 and per_channel_axis(view, view.input(0)) == axis:
            self._slice_scales(view, edit, copies)

    @staticmethod
    def _slice_scales(view: NodeView, edit, copies) -> None:
        for index in (1, 2):
            if view.input(index) is not None:
                edit.slice_input(index, 0, copies)


class DequantizeLinear(QuantizeLinear):
    """Output 0 holds input 0's values, stored at input 0's (integer) precision."""

    stored_as_input = True
    stored_as_output = False

    def evaluate(self, node, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
        """(x - zero_point) * scale, in numpy: onnx's reference runtime has no DequantizeLinear before
        opset 19, and weights are dequantized at load for the weight-slice sources."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x, scale = inputs[0], inputs[1] if len(inputs) > 1 else None
        if x is None or scale is None or attrs.get("block_size") or x.dtype.kind not in "iu":
            return None
        zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros_like(scale, dtype=x.dtype)
        shape = [1] * x.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[normalize_axis(int(attrs.get("axis", 1)), x.ndim)] = scale.size
        values = (x.astype(np.int64) - zero.astype(np.int64).reshape(shape or ())) * scale.reshape(shape or ())
        return [values.astype(scale.dtype)]
