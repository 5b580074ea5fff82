"""Which channel classes are alive: a class dies when every regularization source it has falls
below the threshold (sources combine by max, alive = OR, as in MorphNet)."""

from __future__ import annotations

import numpy as np

from onnx_morph.errors import OptionError
from onnx_morph.graph.channel_graph import ChannelGraph


def source_strength(graph: ChannelGraph, kind: str) -> np.ndarray:
    """Per class, the largest source value of `kind` (|gamma|, or a weight slice's RMS); NaN where none."""
    strength = np.full(graph.num_classes, np.nan)
    cache: dict[tuple[str, int], np.ndarray] = {}
    for group in graph.groups:
        for source in group.sources:
            if source.kind != kind:
                continue
            key = (source.param, source.axis)
            if key not in cache:
                value = graph.model.constant(source.param)
                if value is None:
                    continue
                cache[key] = _per_slice(np.asarray(value, dtype=np.float64), source.axis, kind)
            values = cache[key]
            classes = graph.classes(source.tensor)[source.channels]
            if values.shape[0] != graph.tensors[source.tensor].channels:
                continue
            np.fmax.at(strength, classes, values[source.channels])
    return strength


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
