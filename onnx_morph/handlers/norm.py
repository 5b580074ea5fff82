"""Normalizations: BatchNorm and InstanceNorm scales are MorphNet's gammas; LayerNorm computes
statistics across all channels, so they are pinned; GroupNorm across a group's, so whole groups go.
A BatchNorm after a Linear reshaped to [N, C, H, W] normalizes channel c over its block of H*W features."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx

from onnx_morph.handlers.base import (BaseHandler, NodeView, ParamTerm, Pin, Relation, Source, Tie, along_axis,
                                      collapse_tie, describe, has_channels, normalize_axis, param_dtype,
                                      set_attribute, spread_over_positions)
from onnx_morph.handlers.passthrough import pass_through

NCHW = (1,)


def _fresh_affine(view: NodeView, fills: dict[int, float]) -> dict[int, np.ndarray]:
    """A new normalization layer: scale 1, shift 0 (and BatchNorm's running mean 0, variance 1)."""
    values = {}
    for index, fill in fills.items():
        info = view.input(index)
        if info is not None and info.constant and info.shape is not None:
            values[index] = np.full(info.shape, fill, dtype=param_dtype(view, index))
    return values


def _per_channel_params(view: NodeView, indices: tuple[int, ...], tensor: str | None) -> list[ParamTerm]:
    params = []
    for index in indices:
        info = view.input(index)
        if info is not None and info.shape is not None:
            params.append(ParamTerm(info.name, math.prod(info.shape), tensor))
    return params


class BatchNorm(BaseHandler):
    """Per-channel affine normalization with running statistics (not parameters: buffers)."""

    follows_ties = True
    parameter_inputs = (0, 1, 2)
    running_statistics = (3, 4)

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return NCHW if index == 0 else None

    def to_training(self, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
        """Batch statistics, as training normalizes; the running ones become outputs nothing reads,
        so they stay frozen."""
        set_attribute(node, "training_mode", 1)
        del node.output[1:]
        node.output.extend([fresh(f"{node.output[0]}/running_mean"), fresh(f"{node.output[0]}/running_var")])
        return [node]

    def to_eval(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The running statistics and one output (onnxruntime refuses extra outputs out of training mode)."""
        set_attribute(node, "training_mode", 0)
        del node.output[1:]
        return [node]

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        relation = pass_through(view)
        if x is not None and x.axes == NCHW and not relation.pins:
            scale = view.input(1)
            if scale is not None and scale.constant:
                relation.sources.append(Source("gamma", y.name, view.name, scale.name))
        elif x is not None and spread_over_positions(x, 1) and relation.ties:
            relation.ties.append(collapse_tie(x, 1))  # Linear features reshaped to [N, C, H, W]
        elif x is not None and x.axes is not None and x.axes != NCHW:
            reason = f"{describe(view)} normalizes channels on axis 1, the input's are on {x.axes}"
            relation.pins.append(Pin(x.name, reason))
        relation.params = _per_channel_params(view, (1, 2), y.name)
        return relation


    def varying(self, view: NodeView, relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
        """A channel with scale 0 is its shift on every input."""
        result = super().varying(view, relation, inputs)
        y, scale = view.outputs[0], view.const(1)
        if y is not None and y.axes == NCHW and scale is not None and scale.size == y.channels:
            result[0] = np.asarray(result[0]) & (scale.reshape(-1) != 0)
        return result

    def prune(self, view: NodeView, edit) -> None:
        keep = along_axis(view.input(0), edit.keep(view.input(0).name), 1)
        if keep is not None:
            for index in range(1, len(view.inputs)):
                if view.input(index) is not None:
                    edit.slice_input(index, 0, keep)

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        return _fresh_affine(view, {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0})


class InstanceNorm(BatchNorm):
    """Statistics per sample and channel: channels stay independent, unless the channels also lie
    on the normalized axes (2 and on): then each one's statistics mix several. A scale held in a
    Constant node (torch's GroupNorm, InstanceNorm without affine parameters) is no gamma."""

    running_statistics = None
    no_gradient = "use nn.GroupNorm or nn.BatchNorm2d"
    to_training = BaseHandler.to_training
    to_eval = BaseHandler.to_eval

    def relate(self, view: NodeView) -> Relation:
        x = view.input(0)
        if x is not None and x.axes is not None and any(a >= 2 for a in x.axes):
            relation = pass_through(view, f"{describe(view)} normalizes over channels on axes {[a for a in x.axes if a >= 2]}")
            relation.params = _per_channel_params(view, (1, 2), None)
            return relation
        relation = super().relate(view)
        scale = view.input(1)
        if scale is not None and not scale.stored:
            relation.sources = []
        return relation


class LayerNorm(BaseHandler):
    """Normalizes over axes [axis, rank): a pruned channel would change every other one's statistics."""

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return (normalize_axis(view.attr("axis", -1), rank),) if index == 0 else None

    def to_training(self, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
        """onnxruntime-training builds the gradient only when the node declares all three outputs."""
        node.output.extend(fresh(f"{node.output[0]}/{extra}") for extra in ("mean", "inv_std")[len(node.output) - 1:])
        return [node]

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        if x is None or x.axes is None:
            return Relation([None] * len(view.outputs))
        axis = normalize_axis(view.attr("axis", -1), len(x.shape))
        tied = any(a >= axis for a in x.axes)
        reason = f"{describe(view)} normalizes over these channels" if tied else None
        relation = pass_through(view, reason)
        relation.params = _per_channel_params(view, (1, 2), y.name if tied else None)
        return relation

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        return _fresh_affine(view, {1: 1.0, 2: 0.0})


class GroupNorm(BaseHandler):
    """GroupNormalization: the statistics of a group mix its channels, so a whole group is the unit.
    Its scale and shift are per group before opset 21, per channel from 21 on."""

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return NCHW if index == 0 else None

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        groups = int(view.attr("num_groups", 1))
        if x is not None and x.axes is not None and y.shape is None:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} has no inferred output shape (onnx's shape "
                                                      "inference gives none; exporters' value_info does)")])
        if not has_channels(x) or x.axes != NCHW or x.shape[1] % groups:
            relation = pass_through(view, f"{describe(view)} normalizes groups of channels together")
        else:
            relation = pass_through(view)
            channels = np.arange(x.shape[1], dtype=np.int64)
            per_group = x.shape[1] // groups
            relation.ties.append(Tie(x.name, channels, x.name, channels // per_group * per_group))
            scale = view.input(1)
            if scale is not None and scale.constant and scale.shape is not None and math.prod(scale.shape) == x.shape[1]:
                relation.sources.append(Source("gamma", y.name, view.name, scale.name))
        relation.params = _per_channel_params(view, (1, 2), y.name)
        return relation

    def prune(self, view: NodeView, edit) -> None:
        """num_groups counts the kept (or copied) groups; per-group or per-channel scale and shift follow."""
        x = view.input(0)
        keep = edit.keep(x.name)
        if keep is None:
            return
        groups = int(view.attr("num_groups", 1))
        per_group = keep.reshape(groups, -1)[:, 0]
        edit.set_attr("num_groups", int(per_group.sum()))
        for index in (1, 2):
            info = view.input(index)
            if info is not None and info.shape is not None:
                edit.slice_input(index, 0, keep if info.shape[0] == keep.size else per_group)

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        return _fresh_affine(view, {1: 1.0, 2: 0.0})
