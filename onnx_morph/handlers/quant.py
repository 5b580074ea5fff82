"""Quantization: QuantizeLinear / DequantizeLinear around activations and weights (QDQ models).

On an activation they keep every channel where it is (a per-channel scale and zero point follow
their channels); on a weight, DequantizeLinear lays the stored integers out again as floats, so a
Conv or MatMul reading it is sliced at the integer initializer, together with its per-channel
scales and zero points."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_morph.handlers.base import (BaseHandler, NodeView, Relation, TensorInfo, describe, has_channels,
                                      normalize_axis, pin_all)
from onnx_morph.handlers.conv import Conv, unpadded
from onnx_morph.handlers.elementwise import Elementwise
from onnx_morph.handlers.linear import Gemm, MatMul
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
    parameter_inputs = (0,)  # scales and zero points are quantization settings, not the layer's weights

    def relate(self, view: NodeView) -> Relation:
        x = view.input(0)
        if not has_channels(x):
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

    def zero_of(self, view: NodeView) -> str | None:
        zero = view.input(2)
        return None if zero is None or self.stored_as_input else zero.name

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

    def slice_view(self, view: NodeView, edit, axis: int, copies) -> None:
        """The weight's integers (or floats, for a QuantizeLinear) were sliced along `axis`: so are
        the scales and zero points when they run along it."""
        if per_channel_axis(view, view.input(0)) == axis:
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

    def store_value(self, view: NodeView, edit, value: np.ndarray) -> bool:
        """A new value for a dequantized parameter (a removed channel's constant folded into a bias),
        rounded to its scale: the bias stays int32, and the conv in the runtime's quantized kernels."""
        stored = edit.current(0)
        if stored.dtype.kind not in "iu" or value.shape != stored.shape or int(view.attr("block_size", 0) or 0):
            return False
        scale = np.asarray(edit.current(1), dtype=np.float64)
        zero = np.asarray(edit.current(2), dtype=np.float64) if view.input(2) is not None else np.zeros_like(scale)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * stored.ndim
            shape[normalize_axis(int(view.attr("axis", 1)), stored.ndim)] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        limits = np.iinfo(stored.dtype)
        integers = np.clip(np.round(value / scale) + zero, limits.min, limits.max)
        edit.set_input(0, integers.astype(stored.dtype))
        return True

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


class _Remapped:
    """The editor a float handler (Conv, MatMul) gets for a quantized op: its inputs 0, 1, 2 (input,
    weight, bias) are the op's inputs `indices`, a weight slice along `scaled_axis` also slices the
    per-channel scales and zero points `scales`, and nothing is folded (a removed channel's constant
    lives in the quantized domain)."""

    def __init__(self, edit, indices: tuple[int | None, ...], scaled_axis: int, scales: tuple[int, ...]):
        self.edit, self.indices, self.scaled_axis, self.scales = edit, indices, scaled_axis, scales

    def keep(self, tensor: str):
        return self.edit.keep(tensor)

    def removed_values(self, tensor: str):
        return None

    def folded(self, tensor: str) -> None:
        """Nothing is folded."""

    def slice_input(self, index: int, axis: int, copies) -> None:
        self.edit.slice_input(self.indices[index], axis, copies)
        if index == 1 and axis == self.scaled_axis:
            for scale in self.scales:
                self.edit.slice_input(scale, 0, copies)

    def current(self, index: int):
        return self.edit.current(self.indices[index])

    def set_input(self, index: int, value) -> None:
        self.edit.set_input(self.indices[index], value)

    def set_attr(self, name: str, value) -> None:
        self.edit.set_attr(name, value)


class _QuantizedWeighted(BaseHandler):
    """An integer Conv or MatMul (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger): the float
    op's channel relation and costs on the inputs `indices` (input, weight, bias); the weight's
    per-channel scales and zero points (`scales`, along the weight's output axis) follow its channels.
    Exact: pruned channels contribute nothing, and the other quantization parameters are per tensor."""

    float_handler: BaseHandler
    indices: tuple[int | None, ...] = (0, 1, 2)  # None: the op has no such input
    scales: tuple[int, ...] = ()
    output_zero: int | None = None  # the input holding the output's zero point

    def _float_view(self, view: NodeView) -> NodeView:
        inputs = [None if i is None else view.input(i) for i in self.indices]
        return NodeView(view.node, view.name, inputs, view.outputs, view.constant_of, view.opset)

    def _scaled(self, view: NodeView) -> tuple[int, ...]:
        """The per-channel scale inputs (1-D, more than one entry)."""
        return tuple(i for i in self.scales if (t := view.input(i)) is not None and t.shape is not None
                     and len(t.shape) == 1 and t.shape[0] > 1)

    def relate(self, view: NodeView) -> Relation:
        relation = self.float_handler.relate(self._float_view(view))
        if any(view.input(index).computed for index in self._scaled(view)):
            relation.pins += pin_all(view, f"{describe(view)} has per-channel scales computed at run time")
        zero = view.const(self.scales[-1]) if self.scales else None
        if zero is not None and np.any(zero != 0):
            relation.sources = []  # a stored slice's norm means nothing when its zero is not 0
        return relation

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return self.float_handler.preferred_axes(self._float_view(view), index, rank) if index == 0 else None

    def varying(self, view: NodeView, relation: Relation, inputs):
        remapped = [inputs[i] if i is not None and i < len(inputs) else None for i in self.indices]
        return self.float_handler.varying(self._float_view(view), relation, remapped)

    def prune(self, view: NodeView, edit) -> None:
        remapped = _Remapped(edit, self.indices, self.weight_out_axis(view), self._scaled(view))
        self.float_handler.prune(self._float_view(view), remapped)

    def weight_out_axis(self, view: NodeView) -> int:
        """The weight's output-channel axis, which the per-channel scales run along."""
        return 0

    def zero_of(self, view: NodeView) -> str | None:
        """The input holding the output's zero point (what a removed channel holds in the masked original)."""
        info = None if self.output_zero is None else view.input(self.output_zero)
        return None if info is None else info.name


class QLinearConv(_QuantizedWeighted):
    """x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B (int32)."""

    float_handler = Conv()
    indices, scales, output_zero = (0, 3, 8), (4, 5), 7

    def prune(self, view: NodeView, edit) -> None:
        self._fold(view, edit)
        super().prune(view, edit)

    def _fold(self, view: NodeView, edit) -> None:
        """A removed input channel holding the integer q adds sum_k (q - x_zero) * (w[o, c, k] - w_zero[o])
        to output o's int32 accumulator: exact, in the bias, for an unpadded conv without groups."""
        x = view.input(0)
        removed = edit.removed_values(x.name) if edit.keep(x.name) is not None else None
        if removed is None or int(view.attr("group", 1)) != 1 or x.axes != (1,) or not unpadded(view):
            return
        w = np.asarray(edit.current(3), dtype=np.int64)
        w_zero = np.asarray(edit.current(5), dtype=np.int64).reshape(-1, *([1] * (w.ndim - 1)))
        x_zero = int(np.asarray(edit.current(2)).reshape(()))
        shifted = np.where(removed != 0, np.round(removed) - x_zero, 0).astype(np.int64)
        delta = ((w - w_zero).sum(axis=tuple(range(2, w.ndim))) @ shifted).astype(np.int64)
        bias = np.asarray(edit.current(8), dtype=np.int64) if view.input(8) is not None else np.zeros(w.shape[0], np.int64)
        limits = np.iinfo(np.int32)
        if np.any(bias + delta < limits.min) or np.any(bias + delta > limits.max):
            return
        edit.set_input(8, (bias + delta).astype(np.int32))
        edit.folded(x.name)


class ConvInteger(_QuantizedWeighted):
    """x, w, x_zero_point, w_zero_point: an int32 sum; the zero point may be per output channel."""

    float_handler = Conv()
    indices, scales = (0, 1, None), (3,)


class QLinearMatMul(_QuantizedWeighted):
    """a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point; b's scales per column."""

    float_handler = MatMul()
    indices, scales, output_zero = (0, 3, None), (4, 5), 7

    def weight_out_axis(self, view: NodeView) -> int:
        return 1


class MatMulInteger(QLinearMatMul):
    """A, B, a_zero_point, b_zero_point: an int32 product; b's zero point may be per column."""

    indices, scales, output_zero = (0, 1, None), (3,), None


class DynamicQuantizeLinear(BaseHandler):
    """Quantizes with a scale computed from the values of every channel: removing one changes it."""

    def relate(self, view: NodeView) -> Relation:
        relation = pass_through(view, f"{describe(view)} computes its scale from all channels at run time")
        relation.output_axes += [None] * (len(view.outputs) - len(relation.output_axes))
        return relation


class QGemm(_QuantizedWeighted):
    """com.microsoft QGemm: A, a_scale, a_zero_point, B, b_scale, b_zero_point, C (int32), y_scale,
    y_zero_point (without them the output is float); transA / transB as in Gemm."""

    float_handler = Gemm()
    indices, scales, output_zero = (0, 3, 6), (4, 5), 8

    def weight_out_axis(self, view: NodeView) -> int:
        return 0 if view.attr("transB", 0) else 1

    def output_shapes(self, node, inputs: list[tuple[int, ...] | None]) -> list | None:
        attrs = {a.name: a.i for a in node.attribute}
        a, b = inputs[0], inputs[3] if len(inputs) > 3 else None
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        return [(a[1] if attrs.get("transA") else a[0], b[0] if attrs.get("transB") else b[1])]


class QLinearAdd(BaseHandler):
    """com.microsoft QLinearAdd (and QLinearMul): A, A_scale, A_zero_point, B, B_scale, B_zero_point,
    C_scale, C_zero_point, per-tensor scales: the float op's relation on A and B."""

    follows_ties = True
    float_handler = Elementwise()

    def _float_view(self, view: NodeView) -> NodeView:
        return NodeView(view.node, view.name, [view.input(0), view.input(3)], view.outputs, view.constant_of, view.opset)

    def relate(self, view: NodeView) -> Relation:
        relation = self.float_handler.relate(self._float_view(view))
        if any(t is not None and t.constant and t.shape and max(t.shape) > 1 for t in (view.input(0), view.input(3))):
            relation.pins += pin_all(view, f"{describe(view)} adds a quantized per-channel constant")
        return relation

    def zero_of(self, view: NodeView) -> str | None:
        zero = view.input(7)
        return None if zero is None else zero.name

    def output_shapes(self, node, inputs: list[tuple[int, ...] | None]) -> list | None:
        a, b = inputs[0], inputs[3] if len(inputs) > 3 else None
        if a is None or b is None:
            return None
        try:
            return [tuple(np.broadcast_shapes(a, b))]
        except ValueError:
            return None
