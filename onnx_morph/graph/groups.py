"""Channel groups: the channel classes that span the same set of tensors (MorphNet's OpGroup).

A class is one unit of pruning (a channel, or a whole ResNeXt group); a group is the layer-like
set of such units that the report, the regularizer and surgery treat together.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from onnx_morph.handlers import Relation


@dataclass(frozen=True)
class GroupSource:
    """A regularization source restricted to one group: `channels` index the tensor's channels,
    which are slices of `param` along `axis`."""

    kind: str
    node: str
    param: str
    axis: int
    tensor: str
    channels: np.ndarray


@dataclass
class ChannelGroup:
    id: int
    classes: np.ndarray
    tensors: dict[str, np.ndarray]
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    sources: list[GroupSource] = field(default_factory=list)
    pin_reasons: list[str] = field(default_factory=list)
    pinned_classes: int = 0

    @property
    def size(self) -> int:
        return int(self.classes.size)

    @property
    def prunable(self) -> bool:
        return self.pinned_classes == 0


def build_groups(classes: dict[str, np.ndarray], num_classes: int, class_pins: dict[int, list[str]],
                 relations: dict[str, Relation], nodes: dict[str, onnx.NodeProto],
                 param_root: Callable[[str], tuple[str, tuple[int, ...] | None] | None]) -> list[ChannelGroup]:
    """The groups of the channel classes: `classes` holds each activation's class per channel element
    (in graph order), `class_pins` the pinned classes' reasons; the relations give each group its
    ops, producers, consumers and sources (parameters seen through `param_root`'s views)."""
    if not classes:
        return []
    tensors, per_tensor = list(classes), list(classes.values())
    group_of_class = _group_of_class(per_tensor, num_classes)
    members_of = np.split(np.argsort(group_of_class, kind="stable"),
                          np.flatnonzero(np.diff(np.sort(group_of_class))) + 1)
    groups = [ChannelGroup(g, members.astype(np.int64), {}) for g, members in enumerate(members_of)]
    groups_of_tensor: dict[str, list[ChannelGroup]] = defaultdict(list)
    for name, tensor_classes in zip(tensors, per_tensor):
        element_group = group_of_class[tensor_classes]
        order = np.argsort(element_group, kind="stable")
        for chunk in np.split(order, np.flatnonzero(np.diff(element_group[order])) + 1):
            group = groups[int(element_group[chunk[0]])]
            group.tensors[name] = chunk
            groups_of_tensor[name].append(group)
    for group in groups:
        reasons = [class_pins[c] for c in group.classes.tolist() if c in class_pins]
        group.pinned_classes = len(reasons)
        group.pin_reasons = list(dict.fromkeys(r for rs in reasons for r in rs))
    for name, relation in relations.items():
        _attach(name, nodes[name], relation, groups_of_tensor, param_root)
    return groups


def _group_of_class(per_tensor: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Each class's group: classes spanning the same tensors share one, numbered in graph order (by
    the first tensor of their first class)."""
    # Every (class, tensor) pair once; a class's tensor set is summarized by a 64-bit signature.
    unique_per_tensor = [np.unique(c) for c in per_tensor]
    pair_class = np.concatenate(unique_per_tensor)
    pair_tensor = np.repeat(np.arange(len(per_tensor)), [u.size for u in unique_per_tensor])
    tensor_hash = np.random.default_rng(0).integers(1, 2**63, size=len(per_tensor), dtype=np.uint64)
    signature = np.zeros(num_classes, dtype=np.uint64)
    np.add.at(signature, pair_class, tensor_hash[pair_tensor])
    first_tensor = np.full(num_classes, len(per_tensor), dtype=np.int64)
    np.minimum.at(first_tensor, pair_class, pair_tensor)
    _, group_of_class = np.unique(signature, return_inverse=True)
    rank = first_tensor * num_classes + np.arange(num_classes)
    group_first = np.full(group_of_class.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(group_first, group_of_class, rank)
    renumber = np.empty_like(group_first)
    renumber[np.argsort(group_first, kind="stable")] = np.arange(group_first.size)
    return renumber[group_of_class]


def _attach(name: str, node: onnx.NodeProto, relation: Relation, groups_of_tensor: dict[str, list[ChannelGroup]],
            param_root: Callable[[str], tuple[str, tuple[int, ...] | None] | None]) -> None:
    """Record node `name` in the groups of the tensors it touches: as an op, as the producer or consumer
    of its geometry's channels, and its regularization sources."""
    touched = {t for t in (*node.input, *node.output) if t in groups_of_tensor}
    for t in touched:
        for group in groups_of_tensor[t]:
            if name not in group.ops:
                group.ops.append(name)
    geometry = relation.geometry
    if geometry is not None:
        for group in groups_of_tensor.get(geometry.output, []):
            group.producers.append(name)
        for group in groups_of_tensor.get(geometry.input, []):
            group.consumers.append(name)
    for source in relation.sources:
        root = param_root(source.param)
        param, axis = source.param, source.axis
        if root is not None:
            param, perm = root
            axis = perm[axis] if perm is not None else axis
        for group in groups_of_tensor.get(source.tensor, []):
            group.sources.append(GroupSource(source.kind, name, param, axis, source.tensor, group.tensors[source.tensor]))
