"""Which channels to remove: by threshold, by a mask file, or to meet a FLOP/parameter budget."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from onnx_morph.costs.resources import marginal_cost, total_cost
from onnx_morph.errors import OptionError
from onnx_morph.graph import ChannelGraph, alive_classes, source_strength
from onnx_morph.rewrite.surgery.criteria import Budget

MASK_FORMAT = "onnx-morph-masks"


def ranking_strength(graph: ChannelGraph, kind: str | None = None) -> tuple[np.ndarray, str]:
    """|gamma| (or, given kind="weight" or without BatchNorm, weight-slice RMS) per class; inf where
    a class has no such source, so it is never chosen first."""
    for candidate in (kind,) if kind else ("gamma", "weight"):
        strength = source_strength(graph, candidate)
        if np.isfinite(strength).any():
            return np.where(np.isnan(strength), np.inf, strength), candidate
    return np.full(graph.num_classes, np.inf), "none"


def by_threshold(graph: ChannelGraph, gamma: float | None, weight: float | None) -> np.ndarray:
    return alive_classes(graph, gamma_threshold=gamma, weight_threshold=weight)


def by_budget(graph: ChannelGraph, budget: Budget) -> np.ndarray:
    """Greedy global ranking (network slimming, cost-aware): repeatedly remove the channels with the
    least strength per unit of cost saved until the absolute FLOP or parameter budget is met.

    Channels leave a group `budget.round_to` at a time, so widths stay multiples of it, and every
    group keeps at least `budget.min_keep` of its channels (and at least `round_to`, or all if fewer):
    emptying the cheapest layers first is what an unconstrained ranking does on a freshly initialized model.
    """
    multiple, min_keep = budget.round_to, budget.min_keep
    strength, _ = ranking_strength(graph)
    groups = [g for g in graph.groups if g.prunable]
    floors = {g.id: floor_width(g.size, multiple, min_keep) for g in groups}
    alive = np.ones(graph.num_classes, dtype=bool)
    current = total_cost(graph, alive, budget.resource)
    if budget.target >= current:
        return alive
    least = _at_floor(groups, floors, strength, alive)
    reachable = total_cost(graph, least, budget.resource)
    if budget.target < reachable:
        raise OptionError(
            f"the {budget.resource} budget {budget.target:.4g} is below {reachable:.4g}, the least this model can "
            f"reach (pinned channels stay, and each group keeps {min_keep:.0%} of its channels, at least {multiple})"
        )
    while current > budget.target:
        saving = marginal_cost(graph, alive, budget.resource)
        chunks = [c for g in groups for c in _chunks(g, alive, strength, saving, floors[g.id], multiple)]
        if not chunks:
            break
        chunks.sort(key=lambda c: c[0])
        needed = current - budget.target
        reach = int(np.searchsorted(np.cumsum([c[1] for c in chunks]), needed)) + 1
        step = max(1, min(reach, math.ceil(0.05 * len(chunks))))
        next_chunk: dict[int, int] = {}
        for score, _, group_id, position, classes in chunks[:step]:
            if next_chunk.get(group_id, 0) == position:
                alive[classes] = False
                next_chunk[group_id] = position + 1
        current = total_cost(graph, alive, budget.resource)
    return alive


def budget_shortfall(graph: ChannelGraph, budget: Budget, alive: np.ndarray) -> str | None:
    """Why a budget was not met, in one line, or None when it was."""
    reached = total_cost(graph, alive, budget.resource)
    if reached <= budget.target:
        return None
    full = total_cost(graph, np.ones_like(alive), budget.resource)
    strength, _ = ranking_strength(graph)
    prunable = ~graph.class_pinned()
    unranked = int((prunable & ~np.isfinite(strength)).sum())
    why = (f"; {unranked} prunable channels have nothing to rank them by (no BatchNorm scale, no readable weight "
           "slice, or a producer without one feeding them) and stay") if unranked else ""
    return (f"{budget.resource} target {budget.target:.4g} not reached: {reached:.4g} ({reached / full:.0%} of "
            f"{full:.4g}) remain{why}")


def floor_width(size: int, multiple: int, min_keep: float) -> int:
    """The fewest channels a budget leaves a group of `size`: `min_keep` of it, a multiple of `multiple`."""
    wanted = max(multiple, math.ceil(min_keep * size / multiple) * multiple)
    return min(size, wanted)


def _at_floor(groups, floors, strength: np.ndarray, alive: np.ndarray) -> np.ndarray:
    least = alive.copy()
    for group in groups:
        order = group.classes[np.argsort(-np.nan_to_num(strength[group.classes], posinf=np.finfo(float).max), kind="stable")]
        least[order[floors[group.id]:]] = False
    return least


def _chunks(group, alive, strength, saving, floor: int, multiple: int):
    """The group's removable channels, weakest first, cut so that each removal leaves a multiple of `multiple`.

    Each chunk is (score, saving, group id, position, classes), score being strength per cost saved.
    """
    live = group.classes[alive[group.classes] & np.isfinite(strength[group.classes])]
    live = live[np.argsort(strength[live], kind="stable")]
    count = int(alive[group.classes].sum())
    chunks, start, position = [], 0, 0
    size = count % multiple or multiple
    while count - size >= floor and start + size <= live.size:
        classes = live[start:start + size]
        total_saving = float(saving[classes].sum())
        if total_saving > 0:
            chunks.append((float(strength[classes].sum()) / total_saving, total_saving, group.id, position, classes))
        position += 1
        start += size
        count -= size
        size = multiple
    return chunks


def keep_minimum(graph: ChannelGraph, alive: np.ndarray, kind: str | None = None, minimum: int = 1) -> tuple[np.ndarray, list[int]]:
    """Revive the strongest channels (by `kind`) of groups left with fewer than `minimum` alive;
    returns the ids of the groups touched."""
    strength, _ = ranking_strength(graph, kind)
    alive = alive.copy()
    touched = []
    for group in graph.groups:
        missing = min(minimum, group.size) - int(alive[group.classes].sum())
        if missing > 0:
            _revive_strongest(alive, group.classes, missing, strength)
            touched.append(group.id)
    return alive, touched


def round_widths(graph: ChannelGraph, alive: np.ndarray, multiple: int, kind: str | None = None) -> np.ndarray:
    """Revive the strongest dead channels until each group's width is a multiple of `multiple` (or full)."""
    if multiple <= 1:
        return alive
    strength, _ = ranking_strength(graph, kind)
    alive = alive.copy()
    for group in graph.groups:
        count = int(alive[group.classes].sum())
        want = min(group.size, -(-count // multiple) * multiple)
        if want > count:
            _revive_strongest(alive, group.classes, want - count, strength)
    return alive


def _revive_strongest(alive: np.ndarray, classes: np.ndarray, count: int, strength: np.ndarray) -> None:
    dead = classes[~alive[classes]]
    order = np.argsort(-np.nan_to_num(strength[dead], posinf=np.finfo(float).max), kind="stable")
    alive[dead[order[:count]]] = True


def mask_document(graph: ChannelGraph, alive: np.ndarray) -> dict:
    """The structure JSON: MorphNet's {producer node: alive output channels} plus per-tensor keep masks."""
    structure, masks = {}, {}
    for group in graph.groups:
        if group.prunable:
            tensor = next(iter(group.tensors))
            masks[tensor] = [int(v) for v in alive[graph.classes(tensor)]]
        for name in dict.fromkeys(group.producers):
            geometry = graph.relations[name].geometry
            classes = graph.classes(geometry.output)
            if classes is not None:
                structure[name] = int(alive[classes].sum())
    return {"format": MASK_FORMAT, "version": 1, "model": graph.model.source, "structure": structure, "masks": masks}


def write_mask_document(graph: ChannelGraph, alive: np.ndarray, path: str | Path, kind: str | None = None) -> None:
    """Write the masks that `prune` would apply for this alive set (every group keeps a channel)."""
    from onnx_morph.rewrite.surgery.save import write_text

    alive, _ = keep_minimum(graph, alive, kind)
    text = json.dumps(mask_document(graph, alive), indent=1)
    text = re.sub(r"\[[\s01,]*\]", lambda m: "".join(m.group(0).split()).replace(",", ", "), text)
    write_text(text + "\n", path)


def by_mask_document(graph: ChannelGraph, document: dict | str | Path) -> np.ndarray:
    """Alive classes from a mask JSON (as written by `analyze --structure`); a channel is kept if any mask keeps it."""
    label = "mask document"
    if not isinstance(document, dict):
        label = str(document)
        try:
            document = json.loads(Path(document).read_text())
        except FileNotFoundError:
            raise OptionError(f"{label}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OptionError(f"{label}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != MASK_FORMAT or not isinstance(document.get("masks"), dict):
        raise OptionError(f"{label}: not an onnx-morph mask file (expected \"format\": \"{MASK_FORMAT}\" and a \"masks\" object)")
    pinned = graph.class_pinned()
    seen = np.zeros(graph.num_classes, dtype=bool)
    keep = np.zeros(graph.num_classes, dtype=bool)
    for tensor, mask in document["masks"].items():
        classes = graph.classes(tensor)
        if classes is None:
            raise OptionError(f"{label}: tensor '{tensor}' is not an activation with channels in this model")
        if not isinstance(mask, list) or len(mask) != classes.size or any(v not in (0, 1, True, False) for v in mask):
            raise OptionError(f"{label}: the mask of '{tensor}' must be a list of {classes.size} zeros and ones")
        values = np.array(mask, dtype=bool)
        dropped_pinned = classes[~values & pinned[classes]]
        if dropped_pinned.size:
            reason = graph.class_pins[int(dropped_pinned[0])][0]
            raise OptionError(f"{label}: the mask of '{tensor}' removes a pinned channel ({reason})")
        np.logical_or.at(keep, classes, values)
        seen[classes] = True
    return keep | ~seen | pinned
