"""MorphNet's network regularizer as data: per-channel sources, their grouping, and the cost terms.

Layer 1 turns each source parameter into a per-channel vector (|gamma|, or a weight slice's group
lasso norm). Layer 2 combines the sources of a channel class by max (alive = OR), as MorphNet
groups them. Layer 3 is `CostTerms`, the resource function. The same `Regularizer` is evaluated
in numpy here, emitted as ONNX nodes for onnxruntime-training and built in torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from onnx_morph.costs import Hardware, parse_cost
from onnx_morph.costs.terms import RESOURCES, CostTerms, cost_terms
from onnx_morph.errors import OptionError
from onnx_morph.graph.channel_graph import ChannelGraph

KINDS = {"gamma": "gamma", "group-lasso": "weight"}
DEFAULT_THRESHOLD = 1e-2
# Keeps the gradient of a weight slice's RMS finite when the whole slice is zero.
RMS_EPSILON = 1e-12


@dataclass(frozen=True)
class SourceParam:
    """One parameter whose slices along `axis` regularize channels."""

    param: str
    axis: int
    channels: int


@dataclass(frozen=True)
class Regularizer:
    """Everything needed to compute MorphNet's regularization term and effective cost.

    `gather[j, c]` is the position of class c's j-th source in the concatenation of all source
    vectors followed by one zero; classes with fewer sources repeat the zero. `fixed` marks
    classes that are alive whatever their sources say (pinned, blacklisted, or without one).
    """

    kind: str
    terms: CostTerms
    sources: list[SourceParam]
    gather: np.ndarray
    fixed: np.ndarray
    threshold: float
    l1_fraction: float

    @property
    def zero_position(self) -> int:
        return sum(s.channels for s in self.sources)

    def source_vector(self, param: SourceParam, value: np.ndarray) -> np.ndarray:
        """Per-channel regularization values of one source parameter."""
        value = np.asarray(value, dtype=np.float64)
        if self.kind == "gamma":
            return np.abs(value.reshape(-1))
        slices = np.moveaxis(value, param.axis, 0).reshape(param.channels, -1)
        l1 = np.mean(np.abs(slices), axis=1)
        rms = np.sqrt(np.mean(slices * slices, axis=1) + RMS_EPSILON)
        return self.l1_fraction * l1 + (1 - self.l1_fraction) * rms

    def vector(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """Per class (plus the fixed class), the max over its sources."""
        values = np.concatenate([self.source_vector(s, params[s.param]) for s in self.sources] + [np.zeros(1)])
        return values[self.gather].max(axis=0)

    def alive(self, vector: np.ndarray) -> np.ndarray:
        return (vector > self.threshold) | self.fixed

    def evaluate(self, params: dict[str, np.ndarray]) -> tuple[float, float]:
        """(effective cost, regularization value) for the given source parameters."""
        vector = self.vector(params)
        alive = self.alive(vector)
        return self.terms.evaluate(alive[:-1], vector[:-1])


def build_regularizer(
    graph: ChannelGraph,
    *,
    kind: str = "gamma",
    cost: str = "flops",
    hardware: Hardware | None = None,
    macs: bool = False,
    threshold: float | None = None,
    l1_fraction: float = 0.0,
    input_boundary: list[str] = (),
    output_boundary: list[str] = (),
    force_group: list[str] = (),
    blacklist: list[str] = (),
) -> Regularizer:
    """The regularizer of `kind` (gamma or group-lasso) for the `cost` resource (flops, params,
    activations, or latency:HW; or latency with `hardware`).

    Patterns are regular expressions matched against whole node names. Input-boundary nodes and
    everything before them, and everything after output-boundary nodes, are neither costed nor
    regularized; blacklisted nodes' sources are ignored; the output channels of all nodes matching
    one force-group pattern are regularized as one group. A pattern that matches nothing is an error.
    """
    if kind not in KINDS:
        raise OptionError(f"unknown regularizer '{kind}': use one of {', '.join(KINDS)}")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if not np.isfinite(threshold) or threshold < 0:
        raise OptionError(f"the threshold must be a finite number >= 0, not {threshold}")
    if not 0 <= l1_fraction <= 1:
        raise OptionError(f"l1_fraction must be in [0, 1], not {l1_fraction}")
    if not (cost == "latency" and hardware is not None):
        cost, hardware = parse_cost(cost, RESOURCES)
    region = _region(graph, list(input_boundary), list(output_boundary))
    ignored = _matching(graph, list(blacklist), "blacklist") | (set(graph.nodes) - region)
    terms = cost_terms(graph, cost, macs=macs, hardware=hardware, nodes=region)

    sources: dict[tuple[str, int], SourceParam] = {}
    positions: list[list[int]] = [[] for _ in range(graph.num_classes + 1)]
    offsets: dict[tuple[str, int], int] = {}
    total = 0
    for group in graph.groups:
        for source in group.sources:
            # A source held in a Constant node (BatchNorm without affine) is not a trainable parameter.
            if source.kind != KINDS[kind] or source.node in ignored or graph.model.initializer(source.param) is None:
                continue
            key = (source.param, source.axis)
            if key not in sources:
                shape = graph.model.initializer(source.param).dims
                sources[key] = SourceParam(source.param, source.axis, int(shape[source.axis]))
                offsets[key] = total
                total += sources[key].channels
            classes = graph.classes(source.tensor)[source.channels]
            for channel, cls in zip(source.channels.tolist(), classes.tolist()):
                positions[cls].append(offsets[key] + channel)
    pinned = np.append(graph.class_pinned(), True)
    for cls in np.flatnonzero(pinned):
        positions[cls] = []
    for members in _forced_groups(graph, list(force_group)):
        union = sorted({p for c in members for p in positions[c]})
        for c in members:
            positions[c] = list(union)
    if not any(positions):
        what = "BatchNormalization scale" if kind == "gamma" else "conv or matmul weight"
        hint = (" The gamma regularizer needs BatchNorm: export with do_constant_folding=False, or use the "
                "group-lasso regularizer." if kind == "gamma" else "")
        raise OptionError(f"{graph.model.source}: no {what} regularizes a prunable channel in the regularized "
                          f"region, so the regularizer would be a silent zero.{hint}")
    zero = total
    depth = max(len(p) for p in positions)
    gather = np.full((depth, len(positions)), zero, dtype=np.int64)
    for cls, plist in enumerate(positions):
        gather[:len(plist), cls] = plist
    fixed = np.array([not p for p in positions])
    return Regularizer(kind, terms, list(sources.values()), gather, fixed, float(threshold), float(l1_fraction))


def _matching(graph: ChannelGraph, patterns: list[str], option: str) -> set[str]:
    return set().union(*(_match(graph, pattern, option) for pattern in patterns))


def _match(graph: ChannelGraph, pattern: str, option: str) -> set[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise OptionError(f"{option} pattern '{pattern}' is not a regular expression: {exc}") from None
    hits = {name for name in graph.nodes if compiled.fullmatch(name)}
    if not hits:
        raise OptionError(f"{option} pattern '{pattern}' matches no node of {graph.model.source}")
    return hits


def _region(graph: ChannelGraph, input_boundary: list[str], output_boundary: list[str]) -> set[str]:
    """Nodes strictly after every input-boundary node and up to (and including) output-boundary nodes."""
    producers = {t: name for name, node in graph.nodes.items() for t in node.output}
    consumers: dict[str, list[str]] = {}
    for name, node in graph.nodes.items():
        for t in node.input:
            consumers.setdefault(t, []).append(name)
    region = set(graph.nodes)
    upstream = lambda n: [producers[t] for t in graph.nodes[n].input if t in producers]  # noqa: E731
    if input_boundary:
        boundary = _matching(graph, input_boundary, "input boundary")
        downstream = lambda n: [c for t in graph.nodes[n].output for c in consumers.get(t, [])]  # noqa: E731
        region &= _closure(boundary, downstream) - _closure(boundary, upstream)
    if output_boundary:
        region &= _closure(_matching(graph, output_boundary, "output boundary"), upstream)
    return region


def _closure(start: set[str], step) -> set[str]:
    seen, stack = set(start), list(start)
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _forced_groups(graph: ChannelGraph, patterns: list[str]) -> list[list[int]]:
    """Per pattern and channel index, the classes of the matched nodes' output channels."""
    groups = []
    for pattern in patterns:
        outputs = [graph.classes(graph.nodes[n].output[0]) for n in sorted(_match(graph, pattern, "force-group"))]
        outputs = [c for c in outputs if c is not None]
        widths = {c.size for c in outputs}
        if len(widths) > 1:
            raise OptionError(f"force-group pattern '{pattern}' matches nodes of different widths {sorted(widths)}")
        groups += [sorted(set(column)) for column in zip(*(c.tolist() for c in outputs))]
    return groups
