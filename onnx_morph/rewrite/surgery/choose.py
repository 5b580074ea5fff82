"""Which channels `prune` keeps under each criterion: one function per kind, and `choose` to dispatch."""

from __future__ import annotations

import numpy as np

from onnx_morph.costs import total_cost
from onnx_morph.costs.measured import LatencyTable
from onnx_morph.errors import OptionError
from onnx_morph.graph import ChannelGraph, source_strength
from onnx_morph.rewrite.surgery import select
from onnx_morph.rewrite.surgery.criteria import Budget, Criterion, Mask, Threshold
from onnx_morph.rewrite.surgery.latency import LatencyModel, by_latency, measured_to_target, parse_latency_target


def choose(graph: ChannelGraph, criterion: Criterion, table: LatencyTable | None = None,
           measure: bool = False) -> tuple[np.ndarray, list[str]]:
    """Alive channel classes under `criterion`, and notes for the report. `table` prices a latency
    budget; with `measure`, its choice is timed against the original and made again if it missed."""
    if not (~graph.class_pinned()).any():
        raise OptionError(f"{graph.model.source}: no channel group is prunable (see `onnx-morph analyze` for the reasons)")
    if isinstance(criterion, Threshold):
        return by_threshold(graph, criterion)
    if isinstance(criterion, Mask):
        return by_mask(graph, criterion)
    if criterion.latency is not None:
        return by_latency_budget(graph, criterion, table, measure)
    return by_cost_budget(graph, criterion)


def by_threshold(graph: ChannelGraph, threshold: Threshold) -> tuple[np.ndarray, list[str]]:
    kind = threshold.kind
    alive = select.by_threshold(graph, threshold.gamma, threshold.weight)
    prunable = ~graph.class_pinned()
    if not alive[prunable].any():
        strength = source_strength(graph, kind)[prunable]
        best = np.max(strength[np.isfinite(strength)], initial=0.0)
        raise OptionError(f"the threshold removes every prunable channel (the strongest {kind} is {best:.4g})")
    return _at_least_one(graph, alive, kind, threshold.round_to)


def by_mask(graph: ChannelGraph, mask: Mask) -> tuple[np.ndarray, list[str]]:
    return _at_least_one(graph, select.by_mask_document(graph, mask.document), "gamma", mask.round_to)


def _at_least_one(graph: ChannelGraph, alive: np.ndarray, kind: str, round_to: int) -> tuple[np.ndarray, list[str]]:
    """Every group keeps its strongest channel (by `kind`), and widths round up to multiples of `round_to`."""
    alive, emptied = select.keep_minimum(graph, alive, kind)
    notes = [f"{len(emptied)} groups would lose every channel; each keeps its strongest one"] if emptied else []
    return select.round_widths(graph, alive, round_to, kind), notes


def by_latency_budget(graph: ChannelGraph, budget: Budget, table: LatencyTable,
                      measure: bool) -> tuple[np.ndarray, list[str]]:
    target = parse_latency_target(budget.latency, table)
    alive = by_latency(graph, table, target, min_keep=budget.min_keep)
    notes: list[str] = []
    if measure:
        alive, notes = measured_to_target(graph, table, target, alive, min_keep=budget.min_keep)
    alive, _ = select.keep_minimum(graph, alive)
    reached = LatencyModel(graph, table).predict(alive)
    if reached > target:
        notes.append(f"the latency target {1e3 * target:.4g} ms is out of reach: no further step saves time "
                     f"(predicted {1e3 * reached:.4g} ms)")
    return select.round_widths(graph, alive, budget.round_to), notes


def by_cost_budget(graph: ChannelGraph, budget: Budget) -> tuple[np.ndarray, list[str]]:
    if budget.ratio is not None:
        budget = budget.of_total(total_cost(graph, np.ones(graph.num_classes, dtype=bool), "flops"))
    alive = select.by_budget(graph, budget)
    missed = select.budget_shortfall(graph, budget, alive)
    return alive, [missed] if missed else []
