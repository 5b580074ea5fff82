"""Conv and ConvTranspose: sources of new channels; grouped convs tie channels group by group."""

from __future__ import annotations

import math

import numpy as np

from onnx_morph.errors import ModelLoadError
from onnx_morph.handlers.base import (BaseHandler, NodeView, OpGeometry, ParamTerm, Pin, Relation, Source, Tie,
                                      TensorInfo, along_axis, collapse_tie, describe, fresh_weight_and_bias,
                                      slice_members, spread_over_positions, varying_through_weight)

NCHW = (1,)


def group_ties(x: TensorInfo, y: TensorInfo, groups: int) -> list[Tie]:
    """With groups > 1, every input and output channel of one group lives or dies with the group.

    For depthwise convs (groups = C_in) this ties output j to input j // multiplier; for ResNeXt-style
    groups it makes the whole group the unit of pruning, so group sizes stay equal.
    """
    if groups == 1:
        return []
    c_in, c_out = x.shape[1], y.shape[1]
    per_in, per_out = c_in // groups, c_out // groups
    inputs, outputs = np.arange(c_in, dtype=np.int64), np.arange(c_out, dtype=np.int64)
    first = slice_members(x, 1)[:, 0]  # input channel c's element (c itself unless spread over positions)
    return [
        Tie(x.name, first[inputs], y.name, (inputs // per_in) * per_out),
        Tie(y.name, outputs, y.name, (outputs // per_out) * per_out),
    ]


class Conv(BaseHandler):
    """Conv: W is [C_out, C_in / group, k...]; output channels are new."""

    transposed = False
    parameter_inputs = (1, 2)  # a conv on a constant input (a position-encoding grid) reads it as data

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return NCHW if index == 0 else None

    def relate(self, view: NodeView) -> Relation:
        x, w, y = view.input(0), view.input(1), view.outputs[0]
        relation = Relation([NCHW])
        if w is None or not w.constant or w.shape is None or x is None or x.shape is None or y.shape is None:
            relation.pins = [Pin(t.name, f"{describe(view)} has a weight computed at run time")
                             for t in (x, y) if t is not None and t.is_activation]
            return relation
        groups = int(view.attr("group", 1))
        _check_weight(view, x, w, y, groups, self.transposed)
        if x.axes != NCHW and not spread_over_positions(x, 1):
            relation.pins.append(Pin(x.name, f"{describe(view)} reads channels on axis 1, the input's are on {x.axes}"))
        else:
            relation.ties = group_ties(x, y, groups)
            if x.axes != NCHW:  # Linear features reshaped to [N, C, H, W]: channel c owns its H*W block
                relation.ties.append(collapse_tie(x, 1))
        relation.sources.append(Source("weight", y.name, view.name, w.name, axis=1 if self.transposed else 0))
        relation.geometry = OpGeometry(
            input=x.name,
            in_axis=1,
            output=y.name,
            out_axis=1,
            kernel=math.prod(w.shape[2:]),
            positions=x.shape[0] * math.prod((x.shape if self.transposed else y.shape)[2:]),
            groups=groups,
            weight=w.name,
        )
        bias = view.input(2)
        if bias is not None and bias.shape is not None:
            relation.params.append(ParamTerm(bias.name, math.prod(bias.shape), y.name))
        return relation


    def varying(self, view: NodeView, relation: Relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
        x, y, w = view.input(0), view.outputs[0], view.const(1)
        if relation.pins or w is None or int(view.attr("group", 1)) != 1 or x.axes != NCHW or y.axes != NCHW:
            return super().varying(view, relation, inputs)
        reads = np.any(w.reshape(w.shape[0], w.shape[1], -1) != 0, axis=2)
        result = varying_through_weight(inputs, reads.T if self.transposed else reads)
        return super().varying(view, relation, inputs) if result is None else result

    def prune(self, view: NodeView, edit) -> None:
        x, y = view.input(0), view.outputs[0]
        keep_in, keep_out = along_axis(x, edit.keep(x.name), 1), edit.keep(y.name)
        in_axis, out_axis = (0, 1) if self.transposed else (1, 0)
        groups = int(view.attr("group", 1))
        has_bias = view.input(2) is not None
        if keep_in is not None and groups == 1 and not self.transposed and unpadded(view) and x.axes == NCHW:
            removed = edit.removed_values(x.name)
            if removed is not None:
                # A removed input channel holding the constant c adds c * sum(W[o, c]) to every output o.
                w = view.const(1)
                delta = w.sum(axis=tuple(range(2, w.ndim))) @ removed.astype(w.dtype)
                bias = view.const(2) if has_bias else np.zeros(w.shape[0], dtype=w.dtype)
                edit.set_input(2, (bias + delta).astype(w.dtype))
                edit.folded(x.name)
                has_bias = True
        if keep_out is not None:
            # W's output axis holds C_out (Conv) or C_out / group (ConvTranspose) channels.
            edit.slice_input(1, out_axis, _per_weight_slice(keep_out, groups, self.transposed))
            if has_bias:
                edit.slice_input(2, 0, keep_out)
        if keep_in is not None and (groups == 1 or self.transposed):
            edit.slice_input(1, in_axis, keep_in)
        if groups > 1 and keep_in is not None:
            # Whole groups go, or are copied whole: a group's channels are one class.
            edit.set_attr("group", int(keep_in.sum()) // (x.shape[1] // groups))

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        w = view.input(1)
        if w is None or not w.constant or w.shape is None:
            return {}
        return fresh_weight_and_bias(view, math.prod(w.shape[1:]), rng)  # torch's fan_in for ConvTranspose too


def _check_weight(view: NodeView, x: TensorInfo, w: TensorInfo, y: TensorInfo, groups: int, transposed: bool) -> None:
    """ModelLoadError when the weight contradicts the tensors (onnx's shape inference does not check
    channels): analyzing such a model would count channels no runtime can run."""
    problem = None
    if groups < 1:
        problem = f"has group {groups}"
    elif len(w.shape) != len(x.shape) or len(x.shape) < 3:
        problem = f"has a weight of shape {list(w.shape)} for an input of shape {list(x.shape)}"
    else:
        c_in, c_out = x.shape[1], y.shape[1]
        w_in, w_out = (w.shape[0], w.shape[1] * groups) if transposed else (w.shape[1] * groups, w.shape[0])
        if c_in % groups or c_out % groups:
            problem = f"has group {groups}, which does not divide its {c_in} input and {c_out} output channels"
        elif (c_in, c_out) != (w_in, w_out):
            problem = (f"has a weight of shape {list(w.shape)} (group {groups}) for {c_in} input and "
                       f"{c_out} output channels")
    bias = view.input(2)
    if problem is None and bias is not None and bias.shape is not None and list(bias.shape) != [y.shape[1]]:
        problem = f"has a bias of shape {list(bias.shape)} for {y.shape[1]} output channels"
    if problem is not None:
        raise ModelLoadError(f"{describe(view)} {problem}")


def unpadded(view: NodeView) -> bool:
    """Without padding a constant input channel is constant in every window, so folding it is exact."""
    auto_pad = view.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad in ("NOTSET", "VALID") and not any(view.attr("pads", []) or [])


def _per_weight_slice(keep_out: np.ndarray, groups: int, transposed: bool) -> np.ndarray:
    if not transposed or groups == 1:
        return keep_out
    # Whole groups live, die or are copied, so every group keeps the same output positions.
    return keep_out.reshape(groups, -1).any(axis=0).astype(np.int64)


class ConvTranspose(Conv):
    """ConvTranspose: W is [C_in, C_out / group, k...]; cost counts input positions."""

    transposed = True
