"""Channel groups: the channel classes that span the same set of tensors (MorphNet's OpGroup).

A class is one unit of pruning (a channel, or a whole ResNeXt group); a group is the layer-like
set of such units that the report, the regularizer and surgery treat together.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnx_morph.graph.channel_graph import ChannelGraph


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


def build_groups(graph: ChannelGraph) -> list[ChannelGroup]:
    tensors = list(graph.offsets)
    per_tensor = [graph.classes(t) for t in tensors]
    if not tensors:
        return []
    # Every (class, tensor) pair once; a class's tensor set is summarized by a 64-bit signature.
    unique_per_tensor = [np.unique(c) for c in per_tensor]
    pair_class = np.concatenate(unique_per_tensor)
    pair_tensor = np.repeat(np.arange(len(tensors)), [u.size for u in unique_per_tensor])
    tensor_hash = np.random.default_rng(0).integers(1, 2**63, size=len(tensors), dtype=np.uint64)
    signature = np.zeros(graph.num_classes, dtype=np.uint64)
    np.add.at(signature, pair_class, tensor_hash[pair_tensor])
    first_tensor = np.full(graph.num_classes, len(tensors), dtype=np.int64)
    np.minimum.at(first_tensor, pair_class, pair_tensor)
    _, group_of_class = np.unique(signature, return_inverse=True)
    # Groups in graph order: by the first tensor of their first class.
    rank = first_tensor * graph.num_classes + np.arange(graph.num_classes)
    group_first = np.full(group_of_class.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(group_first, group_of_class, rank)
    renumber = np.empty_like(group_first)
    renumber[np.argsort(group_first, kind="stable")] = np.arange(group_first.size)
    group_of_class = renumber[group_of_class]

    members_of = np.split(np.argsort(group_of_class, kind="stable"),
                          np.flatnonzero(np.diff(np.sort(group_of_class))) + 1)
    groups = [ChannelGroup(g, members.astype(np.int64), {}) for g, members in enumerate(members_of)]
    groups_of_tensor: dict[str, list[ChannelGroup]] = defaultdict(list)
    for name, classes in zip(tensors, per_tensor):
        element_group = group_of_class[classes]
        order = np.argsort(element_group, kind="stable")
        bounds = np.flatnonzero(np.diff(element_group[order])) + 1
        for chunk in np.split(order, bounds):
            group = groups[int(element_group[chunk[0]])]
            group.tensors[name] = chunk
            groups_of_tensor[name].append(group)
    for group in groups:
        reasons = [graph.class_pins[c] for c in group.classes.tolist() if c in graph.class_pins]
        group.pinned_classes = len(reasons)
        group.pin_reasons = list(dict.fromkeys(r for rs in reasons for r in rs))

    for name, relation in graph.relations.items():
        node = graph.nodes[name]
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
            root = graph.param_root(source.param)
            param, axis = source.param, source.axis
            if root is not None:
                param, perm = root
                axis = perm[axis] if perm is not None else axis
            for group in groups_of_tensor.get(source.tensor, []):
                group.sources.append(GroupSource(source.kind, name, param, axis, source.tensor, group.tensors[source.tensor]))
    return groups
