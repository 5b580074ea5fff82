"""Ops whose output channel c is input channel c: activations, pooling, resize, pad, reductions."""

from __future__ import annotations

import onnx

from onnx_morph.handlers.base import (BaseHandler, NodeView, Pin, Relation, TensorInfo, Tie, describe, grid_index,
                                      has_channels, identity_tie, normalize_axis, sub_grid_index)


def keeps_channels(x: TensorInfo, y: TensorInfo | None) -> bool:
    return (
        y is not None
        and y.shape is not None
        and x.shape is not None
        and len(x.shape) == len(y.shape)
        and all(x.shape[a] == y.shape[a] for a in x.axes)
    )


def pass_through(view: NodeView, pin_reason: str | None = None) -> Relation:
    """Input 0's channels become output 0's, pinned when `pin_reason` is given; extra outputs
    (masks, indices, statistics) carry no channels."""
    x, y = view.input(0), view.outputs[0]
    extra = [None] * (len(view.outputs) - 1)
    if not has_channels(x):
        return Relation([None, *extra])
    if not keeps_channels(x, y):
        return Relation([None, *extra], pins=[Pin(x.name, f"{describe(view)} changes the channel dimension")])
    relation = Relation([x.axes, *extra], ties=[identity_tie(x, y)])
    if pin_reason is not None:
        relation.pins.append(Pin(x.name, pin_reason))
    return relation


class Passthrough(BaseHandler):
    """Per-element or per-channel ops that never mix channels."""

    follows_ties = True
    parameter_inputs = (0,)  # Clip bounds, Dropout ratios, Resize scales are settings

    def relate(self, view: NodeView) -> Relation:
        return pass_through(view)

    def output_shapes(self, node: onnx.NodeProto, inputs: list[tuple[int, ...] | None]) -> list | None:
        return [inputs[0]] * len(node.output) if inputs and inputs[0] is not None else None


class Identity(Passthrough):
    preserves_values = True

    def fold(self, node, values, shapes, dtypes) -> list | None:
        return None if not values or values[0] is None else [values[0]]

    def view_permutation(self, node, rank: int) -> tuple[int, ...]:
        return tuple(range(rank))

    def source_axis(self, view: NodeView, axis: int) -> tuple[int, int]:
        return 0, axis

    def entry_source(self, view: NodeView, position: int) -> tuple[int, int]:
        return 0, position


class Cast(Passthrough):
    """Cast keeps the values (indices cast to int32 still index the same table)."""

    preserves_values = True

    def entry_source(self, view: NodeView, position: int) -> tuple[int, int]:
        return 0, position


class SpatialPassthrough(Passthrough):
    """Pooling and resizing: NCHW, channels on axis 1, spatial dims may change."""

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return (1,) if index == 0 else None


class Softmax(BaseHandler):
    """Normalizes along one axis: over the channels, removing one changes all the others."""

    follows_ties = True  # over the channels the relation is pinned, and not followed

    def relate(self, view: NodeView) -> Relation:
        x = view.input(0)
        if x is None or x.axes is None:
            return Relation([None])
        rank = len(x.shape)
        axis = normalize_axis(view.attr("axis", -1 if view.opset >= 13 else 1), rank)
        # Before opset 13 the input was flattened from `axis` on into one normalized row.
        normalized = {axis} if view.opset >= 13 else set(range(axis, rank))
        if normalized & set(x.axes):
            if view.opset >= 13 and len(x.axes) > 1:
                # Over one axis of a channel grid (attention across branches, [B, paths, C]): each
                # normalized row is one channel, which lives or dies whole.
                relation = pass_through(view)
                relation.ties.append(Tie(x.name, grid_index(x).ravel(), x.name, sub_grid_index(
                    x, tuple(a for a in x.axes if a != axis)).ravel()))
                return relation
            return pass_through(view, f"{describe(view)} normalizes over the channel axis")
        return pass_through(view)


class Pad(BaseHandler):
    """Zero padding keeps channels unless it pads the channel axis itself."""

    follows_ties = True
    parameter_inputs = (0,)

    def relate(self, view: NodeView) -> Relation:
        x = view.input(0)
        if x is None or x.axes is None:
            return Relation([None])
        pads = view.attr("pads")
        if pads is None:
            value = view.const(1)
            pads = None if value is None else [int(v) for v in value.ravel()]
        if pads is None:
            return pass_through(view, f"{describe(view)} takes its pads at run time")
        axes_value = view.const(3)
        rank = len(x.shape)
        padded_axes = list(range(rank)) if axes_value is None else [normalize_axis(int(a), rank) for a in axes_value.ravel()]
        half = len(pads) // 2
        for position, axis in enumerate(padded_axes[:half]):
            if axis in x.axes and (pads[position] or pads[position + half]):
                return pass_through(view, f"{describe(view)} pads the channel axis")
        return pass_through(view)


# Reductions to which a zero channel contributes exactly nothing: pruning a channel they sum over
# computes what the original computes with that channel zeroed (an L2 normalization x / ||x||).
ZERO_NEUTRAL = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum"}
_WHY_PINNED = {
    "ReduceMean": " (a removed channel would still count in the mean's divisor)",
    "ReduceMax": " (a zero channel can be the maximum)",
    "ReduceMin": " (a zero channel can be the minimum)",
    "ReduceProd": " (a zero channel zeroes the product)",
    "ReduceLogSumExp": " (a zero channel adds exp(0) = 1)",
    "ArgMax": " (a zero channel can be the maximum)",
    "ArgMin": " (a zero channel can be the minimum)",
}


class Reduce(BaseHandler):
    """Reductions keep channels when they do not reduce over the channel axes; over them, sums
    consume the channels (prunable) and the others pin them."""

    parameter_inputs = (0,)

    follows_ties = True

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        if x is None or x.axes is None or y is None or y.shape is None:
            return Relation([None] * len(view.outputs))
        rank = len(x.shape)
        reduced = self._reduced_axes(view, rank)
        if reduced is None:
            return pass_through(view, f"{describe(view)} takes its axes at run time")
        keepdims = bool(view.attr("keepdims", 1))
        if set(reduced) & set(x.axes) and not set(x.axes) <= set(reduced):
            return _partial_reduction(x, y, reduced, keepdims)
        if set(reduced) & set(x.axes):
            if view.op_type in ZERO_NEUTRAL:
                return Relation([None])  # a removed (zero) channel adds exactly 0: the channels are consumed
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} reduces over the channel axis"
                                                      f"{_WHY_PINNED.get(view.op_type, '')}")])
        out_axes = x.axes if keepdims else tuple(a - sum(r < a for r in reduced) for a in x.axes)
        out = TensorInfo(y.name, y.shape, out_axes)
        return Relation([out_axes], ties=[identity_tie(x, out)])

    @staticmethod
    def _reduced_axes(view: NodeView, rank: int) -> list[int] | None:
        if view.op_type in ("ArgMax", "ArgMin"):
            return [normalize_axis(view.attr("axis", 0), rank)]
        axes = view.attr("axes")
        if axes is None and view.input(1) is not None:
            value = view.const(1)
            if value is None:
                return None
            axes = [int(a) for a in value.ravel()]
        if not axes:
            return [] if view.attr("noop_with_empty_axes", 0) else list(range(rank))
        return [normalize_axis(int(a), rank) for a in axes]


def _partial_reduction(x: TensorInfo, y: TensorInfo, reduced: list[int], keepdims: bool) -> Relation:
    """A reduction over some axes of a channel grid ([B, paths, C] summed over paths): each output
    channel is the elements reduced into it, which live or die together."""
    kept = tuple(a for a in x.axes if a not in reduced)
    out_axes = kept if keepdims else tuple(a - sum(r < a for r in reduced) for a in kept)
    return Relation([out_axes], ties=[Tie(x.name, grid_index(x).ravel(), y.name, sub_grid_index(x, kept).ravel())])
