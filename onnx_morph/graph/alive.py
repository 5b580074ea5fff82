"""Which channel classes are alive: a class dies when every regularization source it has falls
below the threshold (sources combine by max, alive = OR, as in MorphNet), and only if those
sources reach every contribution into it: a producer without one (a Conv without BatchNorm adding
into a residual stream) keeps the class alive whatever the other producers' sources say."""

from __future__ import annotations

import numpy as np

from onnx_morph.errors import OptionError
from onnx_morph.graph.channel_graph import ChannelGraph


def source_strength(graph: ChannelGraph, kind: str) -> np.ndarray:
    """Per class, the largest source value of `kind` (|gamma|, or a weight slice's RMS); NaN where
    none, inf where a contribution into the class has no source of `kind` (it cannot die)."""
    strength = np.full(graph.num_classes, np.nan)
    cache: dict[tuple[str, int], np.ndarray] = {}
    covers: dict[str, list[np.ndarray]] = {}
    for group in graph.groups:
        for source in group.sources:
            if source.kind != kind:
                continue
            key = (source.param, source.axis)
            if key not in cache:
                value = graph.constant(source.param)
                if value is None:
                    continue
                cache[key] = _per_slice(np.asarray(value, dtype=np.float64), source.axis, kind)
            values = cache[key]
            classes = graph.classes(source.tensor)[source.channels]
            if values.shape[0] != graph.tensors[source.tensor].channels:
                continue
            np.fmax.at(strength, classes, values[source.channels])
            covers.setdefault(source.tensor, []).append(source.channels)
    uncovered = ~covered_classes(graph, covers)
    strength[uncovered & ~np.isnan(strength)] = np.inf
    return strength


def covered_classes(graph: ChannelGraph, covers: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Per class, whether its regularization sources reach every contribution into it.

    `covers` gives, per tensor, the channel elements where a source sits (a BatchNorm's output, a
    producer's output for weight slices, a gate's tensor): with that source dead, the element is
    dead. Elsewhere an element is dead when what feeds it is: for most ops every input element of
    its class (an Add of a dead and a live branch is live), for products (relation.product) any
    of them (a dead operand zeroes a Mul), never for a producer of new channels (a Conv, Gemm or
    MatMul with a weight, an embedding) without a source. A class is covered when every element
    of it that an op consumes (reads without passing the class on: a Conv's input) is dead.
    """
    dead = np.zeros(graph.class_of.size, dtype=bool)
    for tensor, parts in covers.items():
        if tensor in graph.offsets:
            dead[graph.offsets[tensor] + np.concatenate(parts)] = True
    uncovered = np.zeros(graph.num_classes, dtype=bool)
    for name in graph.order:
        relation = graph.relations.get(name)
        if relation is not None:
            _propagate(graph, name, relation, dead, uncovered)
    return ~uncovered


def _elements(graph: ChannelGraph, tensors) -> np.ndarray:
    spans = [graph.offsets[t] + np.arange(graph.tensors[t].channels) for t in dict.fromkeys(tensors)
             if t in graph.offsets]
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


def _propagate(graph: ChannelGraph, name: str, relation, dead: np.ndarray, uncovered: np.ndarray) -> None:
    """Mark the node's output elements dead where its inputs make them so, and the classes it
    consumes while live as uncovered."""
    node = graph.nodes[name]
    inputs = _elements(graph, node.input)
    in_classes = graph.class_of[inputs]
    classes, inverse = np.unique(in_classes, return_inverse=True)
    if relation.product:
        combined = np.zeros(classes.size, dtype=bool)
        np.logical_or.at(combined, inverse, dead[inputs])
    else:
        live = np.zeros(classes.size, dtype=bool)
        np.logical_or.at(live, inverse, ~dead[inputs])
        combined = ~live
    geometry = relation.geometry
    fresh = geometry.output if geometry is not None and geometry.weight is not None and geometry.groups == 1 else None
    out_classes = []
    for tensor in dict.fromkeys(node.output):
        outputs = _elements(graph, [tensor])
        if not outputs.size:
            continue
        out_class = graph.class_of[outputs]
        out_classes.append(out_class)
        if tensor == fresh or not classes.size:
            continue
        position = np.minimum(np.searchsorted(classes, out_class), classes.size - 1)
        dead[outputs] |= (classes[position] == out_class) & combined[position]
    passed_on = np.unique(np.concatenate(out_classes)) if out_classes else np.zeros(0, dtype=np.int64)
    consumed = ~np.isin(in_classes, passed_on) & ~dead[inputs]
    uncovered[in_classes[consumed]] = True


def _per_slice(value: np.ndarray, axis: int, kind: str) -> np.ndarray:
    if kind == "gamma":
        return np.abs(value.reshape(-1))
    moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
    return np.sqrt(np.mean(moved * moved, axis=1))


def alive_classes(
    graph: ChannelGraph,
    gamma_threshold: float | None = None,
    weight_threshold: float | None = None,
) -> np.ndarray:
    """Boolean per class. Pinned classes and classes without a source of the chosen kind stay alive."""
    if gamma_threshold is not None and weight_threshold is not None:
        raise OptionError("give either a gamma threshold or a weight threshold, not both")
    alive = np.ones(graph.num_classes, dtype=bool)
    for kind, threshold in (("gamma", gamma_threshold), ("weight", weight_threshold)):
        if threshold is None:
            continue
        if not np.isfinite(threshold) or threshold < 0:
            raise OptionError(f"the {kind} threshold must be a finite number >= 0, not {threshold}")
        strength = source_strength(graph, kind)
        alive = np.isnan(strength) | (strength > threshold)
    alive |= graph.class_pinned()
    return alive
