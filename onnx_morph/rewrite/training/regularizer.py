"""MorphNet's network regularizer as data: per-channel sources, their grouping, and the cost terms.

Layer 1 turns each source parameter into a per-channel vector (|gamma|, a weight slice's group
lasso norm, or a gate's probability sigmoid(logit)). Layer 2 combines the sources of a channel
class by max (alive = OR), as MorphNet groups them; probabilistic gates combine by
1 - prod(1 - p), the probability that at least one gate is open. Layer 3 is `CostTerms`, the
resource function. The term itself is written once in `expression.py` and evaluated in numpy
here, emitted as ONNX nodes for onnxruntime-training and computed in torch.

Gates (FiGS, MorphNet's LogisticSigmoid regularizer) are sources that do not exist in the model:
`Gate` says where the training rewrite inserts one and which producer parameters absorb it after
training, and its logits are a new initializer named under GATE_PREFIX, stored divided by the gate's
logit scale (`Gate.logits` turns the stored parameter back into logits, everywhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from onnx_morph.costs import Hardware, parse_cost
from onnx_morph.costs.terms import RESOURCES, CostTerms, cost_terms
from onnx_morph.errors import OptionError
from onnx_morph.graph.alive import covered_classes
from onnx_morph.graph.channel_graph import ChannelGraph
from onnx_morph.rewrite.training.expression import CostArrays, NumpyBackend, alive_mask, combined, regularization_term

KINDS = {"gamma": "gamma", "group-lasso": "weight", "gates": "gate"}
DEFAULT_THRESHOLD = 1e-2
# MorphNet's alive threshold for gate probabilities.
GATE_THRESHOLD = 0.1
# MorphNet's log_odds_init: p = 0.92, so a gate starts open (the eval mask is 1 and the network is
# unchanged) while sigmoid'(2.5) = 0.07 still lets the regularizer move it.
GATE_LOGIT = 2.5
# A learning-rate multiplier for the gates: the trainable initializer holds logit / scale and the
# graph multiplies it back, so an optimizer step of size lr moves a logit by about scale * lr
# (AdamW's steps are about lr whatever the gradient). Closing a gate (2.5 to below logit(0.1) =
# -2.2) then takes ~940 / scale steps at lr 0.005: 94 at 10, well inside a shrink phase of a few
# hundred steps at the small learning rates that keep the weights trained (at scale 1 no gate
# closes in bench_tradeoff's ~470); much larger scales make a gate flip within a few steps.
GATE_LOGIT_SCALE = 10.0
# A soft but decisive sample: MorphNet's 0.001 makes the mask a Bernoulli draw whose gradient is almost
# everywhere zero, so only the regularizer would move the logits; 0.5 lets the task loss push back.
GATE_TEMPERATURE = 0.5
GATE_PREFIX = "morph/gate/"


@dataclass(frozen=True)
class SourceParam:
    """One parameter whose slices along `axis` regularize channels."""

    param: str
    axis: int
    channels: int


@dataclass(frozen=True)
class Gate:
    """A per-channel gate on `tensor` (channel axis `axis` of `rank`) whose logits are `param`.

    The gate sits where the producer's own per-channel parameters end (after its BatchNorm if it
    has one), so multiplying by a 0/1 mask equals scaling the `fold` slices, (initializer, axis),
    of `node`: that is how the trained model drops the gate.
    """

    param: str
    tensor: str
    axis: int
    rank: int
    channels: int
    node: str
    fold: tuple[tuple[str, int], ...]
    logit_scale: float = GATE_LOGIT_SCALE

    @property
    def shape(self) -> list[int]:
        """The mask's shape, broadcast against the gated tensor."""
        shape = [1] * self.rank
        shape[self.axis] = self.channels
        return shape

    def logits(self, stored: np.ndarray) -> np.ndarray:
        """The gate's logits from its stored (trainable) parameter, as the graph computes them."""
        return np.asarray(stored, dtype=np.float64).reshape(-1) * self.logit_scale

    def initial_parameter(self) -> np.ndarray:
        """The stored parameter the training rewrite starts from: every logit at GATE_LOGIT."""
        return np.full(self.channels, GATE_LOGIT / self.logit_scale, dtype=np.float32)


def check_gate_logit_scale(scale: float) -> None:
    if not (0 < scale < float("inf")):
        raise OptionError(f"the gate logit scale must be a finite number > 0, not {scale}")


@dataclass(frozen=True)
class Regularizer:
    """Everything needed to compute MorphNet's regularization term and effective cost.

    `gather[j, c]` is the position of class c's j-th source in the concatenation of all source
    vectors followed by one zero; classes with fewer sources repeat the zero. `fixed` marks
    classes that are alive whatever their sources say (pinned, blacklisted, without one, or fed
    by a producer without one).
    """

    kind: str
    terms: CostTerms
    sources: list[SourceParam]
    gather: np.ndarray
    fixed: np.ndarray
    threshold: float
    l1_fraction: float
    gates: tuple[Gate, ...] = ()

    @property
    def zero_position(self) -> int:
        return sum(s.channels for s in self.sources)

    @cached_property
    def polynomial(self) -> CostArrays:
        return CostArrays.of(self.terms)

    def vector(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """Per class (plus the fixed class), the max over its sources; for gates, the probability
        that at least one is open."""
        return combined(NumpyBackend(), self, self._inputs(params))

    def alive(self, vector: np.ndarray) -> np.ndarray:
        return alive_mask(NumpyBackend(), self, vector)

    def kept(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """Per class (plus the fixed class), whether a pruned model keeps it: alive, and for gates also
        open in the eval graph (some gate on it with a positive logit). A channel whose gates are all
        closed is zero there, so it goes even when its probability still counts it alive."""
        alive = self.alive(self.vector(params))
        if self.kind != "gates":
            return alive
        logits = np.concatenate([self.gate(s.param).logits(params[s.param]) for s in self.sources] + [np.zeros(1)])
        return alive & ((logits[self.gather] > 0).any(axis=0) | self.fixed)

    def gate(self, param: str) -> Gate:
        return next(g for g in self.gates if g.param == param)

    def initial_gate_parameters(self) -> dict[str, np.ndarray]:
        """The stored gate parameters the training rewrite starts from."""
        return {g.param: g.initial_parameter() for g in self.gates}

    def evaluate(self, params: dict[str, np.ndarray]) -> tuple[float, float]:
        """(effective cost, regularization value) for the given source parameters."""
        term = regularization_term(NumpyBackend(), self, self._inputs(params))
        return float(term.cost), float(term.regularization)

    def _inputs(self, params: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(params[s.param], dtype=np.float64) for s in self.sources]


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
    gates_everywhere: bool = False,
    gate_logit_scale: float = GATE_LOGIT_SCALE,
) -> Regularizer:
    """The regularizer of `kind` (gamma, group-lasso or gates) for the `cost` resource (flops, params,
    activations, or latency:HW; or latency with `hardware`).

    Gates go on the prunable groups that have no BatchNorm scale, or with `gates_everywhere` on
    every prunable group; their trainable parameters are logits / `gate_logit_scale`.

    Patterns are regular expressions matched against whole node names. Input-boundary nodes and
    everything before them, and everything after output-boundary nodes, are neither costed nor
    regularized; blacklisted nodes' sources are ignored; the output channels of all nodes matching
    one force-group pattern are regularized as one group. A pattern that matches nothing is an error.
    """
    threshold = _checked_options(kind, threshold, l1_fraction, gates_everywhere, gate_logit_scale)
    if not (cost == "latency" and hardware is not None):
        cost, hardware = parse_cost(cost, RESOURCES)
    region = _region(graph, list(input_boundary), list(output_boundary))
    ignored = _matching(graph, list(blacklist), "blacklist") | (set(graph.nodes) - region)
    terms = cost_terms(graph, cost, macs=macs, hardware=hardware, nodes=region)
    gates = _gates(graph, ignored, gates_everywhere, gate_logit_scale) if kind == "gates" else []
    found = _gate_sources(graph, gates) if kind == "gates" else _group_sources(graph, KINDS[kind], ignored)
    positions, unreachable = _class_positions(graph, found, list(force_group))
    if not any(positions):
        raise _no_source_error(graph, kind, gates_everywhere, unreachable)
    gather, fixed = _gather_matrix(positions, zero=found.total)
    return Regularizer(kind, terms, list(found.sources.values()), gather, fixed, float(threshold), float(l1_fraction),
                       tuple(gates))


def _checked_options(kind: str, threshold: float | None, l1_fraction: float, gates_everywhere: bool,
                     gate_logit_scale: float) -> float:
    """The threshold (the kind's default if None), after refusing options that do not fit."""
    if kind not in KINDS:
        raise OptionError(f"unknown regularizer '{kind}': use one of {', '.join(KINDS)}")
    if gates_everywhere and kind != "gates":
        raise OptionError(f"gates_everywhere applies to the gates regularizer, not to '{kind}'")
    check_gate_logit_scale(gate_logit_scale)
    if threshold is None:
        threshold = GATE_THRESHOLD if kind == "gates" else DEFAULT_THRESHOLD
    if not np.isfinite(threshold) or threshold < 0:
        raise OptionError(f"the threshold must be a finite number >= 0, not {threshold}")
    if not 0 <= l1_fraction <= 1:
        raise OptionError(f"l1_fraction must be in [0, 1], not {l1_fraction}")
    return threshold


@dataclass
class _Found:
    """The source parameters found, laid end to end (`total` channels), per class the positions of its
    sources in that concatenation, and per tensor the channels a source covers."""

    positions: list[list[int]]
    sources: dict[tuple[str, int], SourceParam] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    covers: dict[str, list[np.ndarray]] = field(default_factory=dict)
    total: int = 0

    def offset(self, param: str, axis: int, channels: int) -> int:
        """Where the parameter's vector starts, appending it the first time."""
        key = (param, axis)
        if key not in self.sources:
            self.sources[key] = SourceParam(param, axis, channels)
            self.offsets[key] = self.total
            self.total += channels
        return self.offsets[key]

    def add(self, offset: int, tensor: str, channels: np.ndarray, classes: np.ndarray) -> None:
        for channel, cls in zip(channels.tolist(), classes.tolist()):
            self.positions[cls].append(offset + channel)
        self.covers.setdefault(tensor, []).append(channels)


def _gate_sources(graph: ChannelGraph, gates: list[Gate]) -> _Found:
    found = _Found([[] for _ in range(graph.num_classes + 1)])
    for gate in gates:
        offset = found.offset(gate.param, 0, gate.channels)
        found.add(offset, gate.tensor, np.arange(gate.channels), graph.classes(gate.tensor))
    return found


def _group_sources(graph: ChannelGraph, wanted: str, ignored: set[str]) -> _Found:
    """The groups' sources of kind `wanted`, except those of ignored nodes and those held in a Constant
    node (BatchNorm without affine), which are no trainable parameter."""
    found = _Found([[] for _ in range(graph.num_classes + 1)])
    for group in graph.groups:
        for source in group.sources:
            initializer = graph.model.initializer(source.param)
            if source.kind != wanted or source.node in ignored or initializer is None:
                continue
            offset = found.offset(source.param, source.axis, int(initializer.dims[source.axis]))
            found.add(offset, source.tensor, source.channels, graph.classes(source.tensor)[source.channels])
    return found


def _class_positions(graph: ChannelGraph, found: _Found, force_group: list[str]) -> tuple[list[list[int]], bool]:
    """Per class (plus the fixed class), the positions of its sources after forced grouping, and
    whether some source was lost to a fixed class.

    Pinned classes, and classes that a producer without a source feeds, live whatever their sources
    say: they are neither regularized nor counted dead (their positions are emptied).
    """
    positions = [list(p) for p in found.positions]
    pinned = np.append(graph.class_pinned(), True)
    fixed_classes = pinned | np.append(~covered_classes(graph, found.covers), True)
    for members in _forced_groups(graph, force_group):
        union = sorted({p for c in members if not fixed_classes[c] for p in positions[c]})
        for c in members:
            positions[c] = list(union)
    unreachable = any(positions[c] for c in np.flatnonzero(fixed_classes & ~pinned))
    for cls in np.flatnonzero(fixed_classes):
        positions[cls] = []
    return positions, unreachable


def _gather_matrix(positions: list[list[int]], zero: int) -> tuple[np.ndarray, np.ndarray]:
    """`Regularizer.gather` (classes with fewer sources repeat the `zero` position) and `fixed`."""
    depth = max(len(p) for p in positions)
    gather = np.full((depth, len(positions)), zero, dtype=np.int64)
    for cls, plist in enumerate(positions):
        gather[:len(plist), cls] = plist
    return gather, np.array([not p for p in positions])


def _no_source_error(graph: ChannelGraph, kind: str, gates_everywhere: bool, unreachable: bool) -> OptionError:
    what = {"gamma": "BatchNormalization scale", "group-lasso": "conv or matmul weight",
            "gates": "gate (a prunable group without BatchNorm)"}[kind]
    hint = {"gamma": " The gamma regularizer needs BatchNorm: export with do_constant_folding=False, or use the "
                     "group-lasso or gates regularizer.",
            "group-lasso": "",
            "gates": "" if gates_everywhere else " Gate every group with gates_everywhere (--gates-everywhere)."}[kind]
    if unreachable:
        alternative = ": use the group-lasso or gates regularizer" if kind == "gamma" else ""
        hint = (" Every channel that has one is also fed by a producer without one (a Conv without BatchNorm "
                f"adding into it), so none can die{alternative}.")
    return OptionError(f"{graph.model.source}: no {what} regularizes a prunable channel in the regularized "
                       f"region, so the regularizer would be a silent zero.{hint}")


def _gates(graph: ChannelGraph, ignored: set[str], everywhere: bool, logit_scale: float) -> list[Gate]:
    """One gate per producer of a prunable group's channels: on the BatchNorm output where a
    producer feeds one (a gate before it would be normalized away), else on the producer's output.
    Groups with a BatchNorm scale get gates only `everywhere`."""
    gates: dict[str, Gate] = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        usable = [s for s in group.sources if s.node not in ignored and graph.model.initializer(s.param) is not None]
        gammas = [s for s in usable if s.kind == "gamma"]
        if gammas and not everywhere:
            continue
        normalized = {t for s in gammas for t in graph.nodes[s.node].input}
        chosen = gammas + [s for s in usable if s.kind == "weight" and s.tensor not in normalized]
        for source in chosen:
            gate = _gate(graph, source, logit_scale)
            if gate is not None:
                gates.setdefault(gate.tensor, gate)
    position = {name: i for i, name in enumerate(graph.order)}
    return sorted(gates.values(), key=lambda g: position[g.node])


def _gate(graph: ChannelGraph, source, logit_scale: float) -> Gate | None:
    """The gate on a source's tensor, or None where a 0/1 mask cannot be folded into the node's
    initializers (the tensor spans other groups, or a slice is not one channel per tensor channel)."""
    info = graph.tensors[source.tensor]
    channels = info.channels
    if info.axes is None or len(info.axes) != 1 or source.channels.size != channels:
        return None
    if graph.model.initializer(source.param).dims[source.axis] != channels:
        return None
    fold = [(source.param, source.axis)]
    for term in graph.relations[source.node].params:
        root = graph.param_root(term.param)
        if term.tensor != source.tensor or (root is not None and root[0] == source.param):
            continue
        if root is None or root[1] is not None or term.size != channels:
            return None
        dims = list(graph.model.initializer(root[0]).dims)
        fold.append((root[0], dims.index(channels)))
    param = f"{GATE_PREFIX}{source.tensor.lstrip('/')}"
    if graph.model.initializer(param) is not None or param in graph.offsets:
        raise OptionError(f"node '{source.node}': the gate's logits would be named '{param}', which the model uses")
    return Gate(param, source.tensor, info.axes[0], len(info.shape), channels, source.node, tuple(fold),
                float(logit_scale))


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
    """Nodes strictly after every input-boundary node and up to (and including) output-boundary nodes:
    reachability in the channel graph's networkx view."""
    import networkx as nx

    view, region = graph.nx, set(graph.nodes)
    if input_boundary:
        starts = _matching(graph, input_boundary, "input boundary")
        after = set().union(*(nx.descendants(view, n) for n in starts))
        region &= after - starts.union(*(nx.ancestors(view, n) for n in starts))
    if output_boundary:
        ends = _matching(graph, output_boundary, "output boundary")
        region &= ends.union(*(nx.ancestors(view, n) for n in ends))
    return region


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


@dataclass(frozen=True)
class RegularizerOptions:
    """How the regularizer was built; stored so training can rebuild the same one."""

    kind: str = "gamma"
    cost: str = "flops"
    threshold: float | None = None
    l1_fraction: float = 0.0
    macs: bool = False
    input_boundary: tuple[str, ...] = ()
    output_boundary: tuple[str, ...] = ()
    force_group: tuple[str, ...] = ()
    blacklist: tuple[str, ...] = ()
    gate_temperature: float = GATE_TEMPERATURE
    straight_through: bool = False
    gates_everywhere: bool = False
    gate_logit_scale: float = GATE_LOGIT_SCALE

    def __post_init__(self):
        if not (0 < self.gate_temperature < float("inf")):
            raise OptionError(f"the gate temperature must be a finite number > 0, not {self.gate_temperature}")
        check_gate_logit_scale(self.gate_logit_scale)
        if self.kind != "gates" and (self.straight_through or self.gates_everywhere
                                     or self.gate_temperature != GATE_TEMPERATURE
                                     or self.gate_logit_scale != GATE_LOGIT_SCALE):
            raise OptionError(f"gate temperature, gate logit scale, straight-through and gates-everywhere apply to "
                              f"the gates regularizer, not to '{self.kind}'")

    def build(self, graph: ChannelGraph) -> Regularizer:
        return build_regularizer(
            graph, kind=self.kind, cost=self.cost, threshold=self.threshold, l1_fraction=self.l1_fraction,
            macs=self.macs, input_boundary=list(self.input_boundary), output_boundary=list(self.output_boundary),
            force_group=list(self.force_group), blacklist=list(self.blacklist), gates_everywhere=self.gates_everywhere,
            gate_logit_scale=self.gate_logit_scale)
