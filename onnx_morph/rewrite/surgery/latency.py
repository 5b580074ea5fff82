"""Pruning to a measured latency: a greedy removal that ranks channels by importance per predicted
second saved, and moves each group's width from one step edge of its ops' staircases to the next.

Widths are chosen among the table's grid points seen from each group (the widths at which some op
touching the group sits on a grid point of its axis), the multiples of 16 (where a thinned grid does
not resolve the steps) and the group's floor: from the current width, the group goes to the widest
candidate whose predicted latency is lower by more than the table's noise, i.e. the widest width of
the next lower step. Widths on a flat part of a step cost as much as the step's top and are never
chosen. The last removal is the step that overshoots the target least.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_morph.costs.measured import LatencyTable
from onnx_morph.errors import OptionError
from onnx_morph.graph import ChannelGraph
from onnx_morph.rewrite.surgery.criteria import latency_spec
from onnx_morph.rewrite.surgery.select import floor_width, ranking_strength

RELATIVE_TOLERANCE = 0.005  # a step must save this share of its ops' latency (besides twice their noise)


@dataclass(frozen=True)
class _Op:
    name: str
    in_classes: np.ndarray | None  # None: the axis never shrinks
    out_classes: np.ndarray | None
    in_width: int
    out_width: int


class LatencyModel:
    """The table's prediction for any alive set of a model's channel classes."""

    def __init__(self, graph: ChannelGraph, table: LatencyTable):
        self.graph, self.table = graph, table
        self.ops: list[_Op] = []
        for name in table.ops:
            geometry = graph.relations[name].geometry
            c_in, c_out = (graph.axis_classes(t, axis) if t in graph.tensors else None
                           for t, axis in ((geometry.input, geometry.in_axis), (geometry.output, geometry.out_axis)))
            op = table.ops[name]
            self.ops.append(_Op(name, c_in, c_out, op.in_width, op.out_width))

    def widths(self, op: _Op, alive: np.ndarray) -> tuple[int, int]:
        a_in = op.in_width if op.in_classes is None else int(alive[op.in_classes].sum())
        a_out = op.out_width if op.out_classes is None else int(alive[op.out_classes].sum())
        return a_in, a_out

    def op_seconds(self, op: _Op, alive: np.ndarray) -> float:
        return self.table.op_latency(op.name, *self.widths(op, alive))

    def op_noise(self, op: _Op, alive: np.ndarray) -> float:
        return self.table.scale * self.table.ops[op.name].noise_at(*self.widths(op, alive))

    def predict(self, alive: np.ndarray) -> float:
        """Predicted latency of the whole model: the ops' interpolated latencies plus the fixed overhead."""
        return sum(self.op_seconds(op, alive) for op in self.ops) + self.table.overhead_seconds

    def ops_of(self, classes: np.ndarray) -> list[_Op]:
        members = set(classes.tolist())
        return [op for op in self.ops if any(
            c is not None and not members.isdisjoint(c.tolist()) for c in (op.in_classes, op.out_classes))]


def parse_latency_target(target: float | str, table: LatencyTable) -> float:
    """Seconds: a fraction of the table's measured whole-model latency ('0.5'), or a time ('3.2ms', '800us', '0.01s')."""
    value, unit = latency_spec(target)
    return value * table.model_seconds if unit is None else value * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


def by_latency(graph: ChannelGraph, table: LatencyTable, target: float, *, min_keep: float = 0.1) -> np.ndarray:
    """Alive classes whose predicted latency meets `target` seconds (within one step), removing the
    weakest channels per predicted second saved; every group keeps `min_keep` of its channels."""
    model = LatencyModel(graph, table)
    strength, _ = ranking_strength(graph)
    groups = [g for g in graph.groups if g.prunable]
    # Floors are multiples of 8 where a group is that wide: onnxruntime's blocked kernels pad to 8 or 16.
    floors = {g.id: floor_width(g.size, 8 if g.size >= 16 else 1, min_keep) for g in groups}
    touching = {g.id: model.ops_of(g.classes) for g in groups}
    alive = np.ones(graph.num_classes, dtype=bool)
    current = model.predict(alive)
    if target >= current:
        return alive
    least = alive.copy()
    for g in groups:
        least[_weakest(g.classes, alive, strength, g.size - floors[g.id])] = False
    reachable = model.predict(least)
    if target < reachable:
        raise OptionError(f"the latency target {1e3 * target:.4g} ms is below {1e3 * reachable:.4g} ms, the least the "
                          f"table predicts for this model (pinned channels stay, each group keeps {min_keep:.0%})")
    neighbours = {g.id: {h.id for h in groups if _share(touching[g.id], touching[h.id])} for g in groups}
    steps = {g.id: _next_step(model, g, touching[g.id], alive, strength, floors[g.id]) for g in groups}
    while current > target:
        candidates = [(s[0], gid) for gid, s in steps.items() if s is not None]
        if not candidates:
            break
        _, gid = min(candidates)
        if steps[gid][1] >= current - target:  # the last step: the one that overshoots least
            gid = min((s[1], g) for g, s in steps.items() if s is not None and s[1] >= current - target)[1]
        alive[steps[gid][2]] = False
        current = model.predict(alive)
        for other in neighbours[gid]:
            group = next(g for g in groups if g.id == other)
            steps[other] = _next_step(model, group, touching[other], alive, strength, floors[other])
    return alive


def _share(a: list[_Op], b: list[_Op]) -> bool:
    return not {op.name for op in a}.isdisjoint(op.name for op in b)


def _weakest(classes: np.ndarray, alive: np.ndarray, strength: np.ndarray, count: int) -> np.ndarray:
    live = classes[alive[classes] & np.isfinite(strength[classes])]
    return live[np.argsort(strength[live], kind="stable")][:max(count, 0)]


def _candidate_widths(model: LatencyModel, group, ops: list[_Op], alive: np.ndarray, width: int,
                      floor: int) -> list[int]:
    """Group widths below `width` at which some op touching the group sits on a grid point of its axis,
    the multiples of 16 and the floor, widest first."""
    members = set(group.classes.tolist())
    widths = set(range(16, width, 16)) | {floor}
    for op in ops:
        a_in, a_out = model.widths(op, alive)
        table = model.table.ops[op.name]
        for classes, axis_width, axis in ((op.in_classes, a_in, "in"), (op.out_classes, a_out, "out")):
            if classes is None or members.isdisjoint(classes.tolist()):
                continue
            widths.update(width - (axis_width - g) for g in table.widths(axis) if g < axis_width)
    return sorted((w for w in widths if 0 < w < width), reverse=True)


def _next_step(model: LatencyModel, group, ops: list[_Op], alive: np.ndarray, strength: np.ndarray, floor: int):
    """(strength per second saved, seconds saved, classes to remove) down to the next step edge, or None."""
    width = int(alive[group.classes].sum())
    before = sum(model.op_seconds(op, alive) for op in ops)
    tolerance = 2 * sum(model.op_noise(op, alive) for op in ops) + RELATIVE_TOLERANCE * before
    order = _weakest(group.classes, alive, strength, width)
    for candidate in _candidate_widths(model, group, ops, alive, width, floor):
        if candidate < floor or order.size < width - candidate:
            break
        removed = order[:width - candidate]
        trial = alive.copy()
        trial[removed] = False
        saving = before - sum(model.op_seconds(op, trial) for op in ops)
        if saving > tolerance:
            return float(strength[removed].sum()) / saving, saving, removed
    return None


def measured_to_target(graph: ChannelGraph, table: LatencyTable, target: float, alive: np.ndarray, *,
                       min_keep: float = 0.1, rounds: int = 2, tolerance: float = 0.03) -> tuple[np.ndarray, list[str]]:
    """NetAdapt's check on the table's choice: the candidate is timed against the original now (in turns,
    on the table's provider, threads and batch); while it keeps more than the target's share of the
    original's latency (by over `tolerance`), the prediction's error is taken out of the target and the
    channels are chosen again. Returns the alive set and what happened, for the report."""
    from onnx_morph.rewrite.surgery.surgery import remove_channels
    from onnx_morph.rewrite.surgery.timing import measure_as_table

    original = graph.model.materialized()
    wanted, goal, notes = target / table.model_seconds, target, []
    for _ in range(rounds):
        candidate = remove_channels(graph, alive, original, {}).model
        full, pruned = (m.median for m in measure_as_table(graph, table, [original, candidate]))
        kept = pruned / full
        if kept <= wanted * (1 + tolerance):
            break
        goal *= wanted / kept
        notes.append(f"measured {kept:.0%} of the original's latency for a target of {wanted:.0%}: chose again for a "
                     f"predicted {1e3 * goal:.4g} ms")
        alive = by_latency(graph, table, goal, min_keep=min_keep)
    return alive, notes
