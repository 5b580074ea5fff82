"""Broadcasting elementwise ops (Add, Mul, Where, PRelu, ...): operands' channel c are one channel.

A constant operand that spans the channels is a per-channel parameter (a bias, a layer scale);
an operand of size 1 on the channel axis broadcasts and ties nothing.
"""

from __future__ import annotations

import math

from typing import Callable

import numpy as np
import onnx

from onnx_morph.errors import InvariantError
from onnx_morph.handlers.base import (
    BaseHandler,
    NodeView,
    ParamTerm,
    Pin,
    Relation,
    TensorInfo,
    Tie,
    describe,
    identity_tie,
    sub_grid_index,
)


def _single_axis(axes):
    if axes is None or len(axes) != 1:
        raise InvariantError("surgery reached a tensor without a single channel axis")
    return axes


def _aligned(info: TensorInfo, out_rank: int) -> tuple[int, ...]:
    """The operand's shape padded on the left to the output's rank, as broadcasting aligns it."""
    return (1,) * (out_rank - len(info.shape)) + tuple(info.shape)


class Elementwise(BaseHandler):
    follows_ties = True

    def relate(self, view: NodeView) -> Relation:
        y = view.outputs[0]
        operands = [t for t in view.inputs if t is not None]
        if y is None or y.shape is None or any(t.shape is None for t in operands):
            return Relation([None], pins=[Pin(t.name, f"{describe(view)} has operands of unknown shape")
                                          for t in operands if t.is_activation and t.axes is not None])
        rank = len(y.shape)
        out_axes = self._output_axes(operands, y, rank)
        if out_axes is None:
            return Relation([None], params=self._params(operands, y, None, rank))
        out = TensorInfo(y.name, y.shape, out_axes)
        relation = Relation([out_axes], params=self._params(operands, y, out_axes, rank), product=view.op_type == "Mul")
        reason = f"{describe(view)} combines operands whose channel layouts differ"
        pins, ties = _unsliceable_constants(view, operands, out)
        relation.pins += pins
        relation.ties += ties
        for t in operands:
            if t.constant:
                continue
            shape = _aligned(t, rank)
            if all(shape[a] == 1 for a in out_axes):
                continue
            shift = rank - len(t.shape)
            axes = None if t.axes is None else tuple(a + shift for a in t.axes)
            if axes == out_axes:
                relation.ties.append(identity_tie(t, out))
            elif axes is not None and set(axes) < set(out_axes) and all(shape[a] == y.shape[a] for a in axes):
                # Its channels are a sub-grid of the output's (branch outputs [B, paths, C] times
                # per-path attention [B, paths, C] with channel axes (1, 2)): each output element is its channel.
                relation.ties.append(Tie(y.name, np.arange(out.channels, dtype=np.int64), t.name,
                                         sub_grid_index(out, axes).ravel()))
            else:
                relation.pins.append(Pin(y.name, reason))
                if t.axes is not None:
                    relation.pins.append(Pin(t.name, reason))
        return relation

    def prune(self, view: NodeView, edit) -> None:
        """Per-channel constants (biases, layer scales, PRelu slopes) lose the removed channels."""
        y = view.outputs[0]
        keep = edit.keep(y.name)
        if keep is None:
            return
        axes = self.relate(view).output_axes[0]
        if axes is not None and len(axes) > 1:
            _slice_grid_constants(view, edit, TensorInfo(y.name, y.shape, axes), keep)
            return
        (axis,) = _single_axis(axes)
        rank = len(y.shape)
        for index, t in enumerate(view.inputs):
            if t is not None and t.constant and _aligned(t, rank)[axis] == keep.size > 1:
                edit.slice_input(index, axis - (rank - len(t.shape)), keep)

    @staticmethod
    def _output_axes(operands: list[TensorInfo], y: TensorInfo, rank: int) -> tuple[int, ...] | None:
        """The channel axes of the operand with the most full-size ones (the others may be a sub-grid)."""
        best = None
        for t in operands:
            if t.constant or t.axes is None:
                continue
            shift = rank - len(t.shape)
            axes = tuple(a + shift for a in t.axes)
            if all(_aligned(t, rank)[a] == y.shape[a] for a in axes) and (best is None or len(axes) > len(best)):
                best = axes
        return best

    @staticmethod
    def _params(operands: list[TensorInfo], y: TensorInfo, out_axes, rank: int) -> list[ParamTerm]:
        params = []
        for t in operands:
            if not t.constant:
                continue
            spans = out_axes is not None and all(_aligned(t, rank)[a] == y.shape[a] > 1 for a in out_axes)
            params.append(ParamTerm(t.name, math.prod(t.shape), y.name if spans else None))
        return params


def _slice_grid_constants(view: NodeView, edit, y: TensorInfo, keep: np.ndarray) -> None:
    """Constants spanning axes of a channel grid (a per-head scale) keep the surviving slices of each."""
    rank = len(y.shape)
    grid = keep.reshape([y.shape[a] for a in y.axes]).astype(bool)
    for position, axis in enumerate(y.axes):
        along = grid.any(axis=tuple(p for p in range(grid.ndim) if p != position))
        if along.all():
            continue
        for index, t in enumerate(view.inputs):
            if t is not None and t.constant and _aligned(t, rank)[axis] == along.size > 1:
                edit.slice_input(index, axis - (rank - len(t.shape)), along)


class Sum(Elementwise):
    """Sum of any number of operands; onnxruntime-training differentiates it only as a chain of Adds."""

    def to_training(self, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
        if len(node.input) <= 2:
            return [node]
        chain, current = [], node.input[0]
        for i, operand in enumerate(node.input[1:], start=1):
            output = node.output[0] if i == len(node.input) - 1 else fresh(f"{node.name}/sum_{i}")
            chain.append(onnx.helper.make_node("Add", [current, operand], [output], name=f"{node.name}/add_{i}"))
            current = output
        return chain


def _unsliceable_constants(view: NodeView, operands: list[TensorInfo], y: TensorInfo) -> tuple[list[Pin], list[Tie]]:
    """A per-channel constant computed by nodes at run time cannot lose channels in surgery unless its
    channel axes are one initializer's axes laid out again (Swin's relative position bias, gathered per
    head from its table: surgery slices the table). Spanning every channel axis, it pins the channels;
    spanning only some axes of a channel grid (rotary cos/sin tables over the head dims of heads x dims),
    it ties the elements along those axes together, so that only whole slices along the others (heads)
    can go and the constant is never sliced."""
    rank, pins, ties = len(y.shape), [], []
    verb = {"Add": "adds", "Mul": "multiplies by"}.get(view.op_type, "combines with")
    for t in operands:
        if not (t.constant and t.computed):
            continue
        spanned = [a for a in y.axes if _aligned(t, rank)[a] == y.shape[a] > 1 and a - (rank - len(t.shape)) not in t.sliceable]
        if len(spanned) == len(y.axes):
            pins.append(Pin(y.name, f"{describe(view)} {verb} per-channel values computed at run time ('{t.name}') that "
                                    f"are not one parameter's axis laid out again, so surgery cannot slice them"))
        elif spanned:
            ties.append(_tie_along(y, spanned))
    return pins, ties


def _tie_along(y: TensorInfo, axes: list[int]) -> Tie:
    """Each channel element of `y` tied to the one at index 0 of `axes` with its other coordinates."""
    dims = [y.shape[a] for a in y.axes]
    ids = np.arange(math.prod(dims), dtype=np.int64).reshape(dims)
    first = ids[tuple(slice(0, 1) if a in axes else slice(None) for a in y.axes)]
    return Tie(y.name, ids.reshape(-1), y.name, np.broadcast_to(first, ids.shape).reshape(-1))
