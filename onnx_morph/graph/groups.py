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
    class_tensors: dict[int, list[str]] = defaultdict(list)
    for tensor in graph.offsets:
        for c in np.unique(graph.classes(tensor)).tolist():
            class_tensors[c].append(tensor)
    by_key: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for c, tensors in sorted(class_tensors.items(), key=lambda item: (graph.offsets[item[1][0]], item[0])):
        by_key[tuple(tensors)].append(c)

    groups: list[ChannelGroup] = []
    groups_of_tensor: dict[str, list[ChannelGroup]] = defaultdict(list)
    for key, classes in by_key.items():
        members = np.array(classes, dtype=np.int64)
        tensors = {t: np.flatnonzero(np.isin(graph.classes(t), members)) for t in key}
        group = ChannelGroup(len(groups), members, tensors)
        reasons = [graph.class_pins[c] for c in classes if c in graph.class_pins]
        group.pinned_classes = len(reasons)
        group.pin_reasons = list(dict.fromkeys(r for rs in reasons for r in rs))
        groups.append(group)
        for t in key:
            groups_of_tensor[t].append(group)

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
