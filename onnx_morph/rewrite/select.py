"""Which channels to remove: by threshold, by a mask file, or to meet a FLOP/parameter budget."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_morph.costs.resources import marginal_cost, total_cost
from onnx_morph.errors import OptionError
from onnx_morph.graph import ChannelGraph, alive_classes, source_strength

MASK_FORMAT = "onnx-morph-masks"


@dataclass(frozen=True)
class Budget:
    resource: str  # "flops" or "params"
    target: float


def ranking_strength(graph: ChannelGraph) -> tuple[np.ndarray, str]:
    """|gamma| where the model has BatchNorm sources, else weight-slice RMS; inf where a class has neither."""
    for kind in ("gamma", "weight"):
        strength = source_strength(graph, kind)
        if np.isfinite(strength).any():
            return np.where(np.isnan(strength), np.inf, strength), kind
    return np.full(graph.num_classes, np.inf), "none"


def by_threshold(graph: ChannelGraph, gamma: float | None, weight: float | None) -> np.ndarray:
    return alive_classes(graph, gamma_threshold=gamma, weight_threshold=weight)


def by_budget(graph: ChannelGraph, budget: Budget, *, min_per_group: int = 1) -> np.ndarray:
    """Greedy global ranking (network slimming, cost-aware): repeatedly remove the alive channels
    with the least strength per unit of cost saved, until the budget is met."""
    pinned = graph.class_pinned()
    strength, _ = ranking_strength(graph)
    alive = np.ones(graph.num_classes, dtype=bool)
    current = total_cost(graph, alive, budget.resource)
    if budget.target >= current:
        return alive
    floor = _floor(graph, alive, pinned, budget.resource)
    if budget.target < floor:
        raise OptionError(
            f"the {budget.resource} budget {budget.target:.4g} is below {floor:.4g}, the least this model can reach "
            f"(pinned channels and {min_per_group} channel per group stay)"
        )
    while current > budget.target:
        saving = marginal_cost(graph, alive, budget.resource)
        removable = alive & ~pinned & np.isfinite(strength) & (saving > 0) & _not_last(graph, alive, min_per_group)
        candidates = np.flatnonzero(removable)
        if candidates.size == 0:
            break
        order = candidates[np.argsort(strength[candidates] / saving[candidates], kind="stable")]
        needed = current - budget.target
        reach = np.searchsorted(np.cumsum(saving[order]), needed) + 1
        step = max(1, min(reach, math.ceil(0.05 * candidates.size)))
        chosen = _one_per_group_at_a_time(graph, order[:step], alive, min_per_group)
        alive[chosen] = False
        current = total_cost(graph, alive, budget.resource)
    return alive


def _floor(graph: ChannelGraph, alive: np.ndarray, pinned: np.ndarray, resource: str) -> float:
    minimal = pinned.copy()
    for group in graph.groups:
        if group.prunable:
            minimal[group.classes[0]] = True
    return total_cost(graph, minimal, resource)


def _not_last(graph: ChannelGraph, alive: np.ndarray, min_per_group: int) -> np.ndarray:
    ok = np.ones(graph.num_classes, dtype=bool)
    for group in graph.groups:
        if alive[group.classes].sum() <= min_per_group:
            ok[group.classes] = False
    return ok


def _one_per_group_at_a_time(graph, chosen, alive, min_per_group) -> np.ndarray:
    """Keep each group at its minimum even when one step picks several of its channels."""
    group_of = np.empty(graph.num_classes, dtype=np.int64)
    for group in graph.groups:
        group_of[group.classes] = group.id
    room = {g.id: int(alive[g.classes].sum()) - min_per_group for g in graph.groups}
    taken = []
    for c in chosen.tolist():
        if room[group_of[c]] > 0:
            room[group_of[c]] -= 1
            taken.append(c)
    return np.array(taken, dtype=np.int64)


def keep_minimum(graph: ChannelGraph, alive: np.ndarray, minimum: int = 1) -> tuple[np.ndarray, list[int]]:
    """Revive the strongest channels of groups left with fewer than `minimum` alive; returns the groups touched."""
    strength, _ = ranking_strength(graph)
    alive = alive.copy()
    touched = []
    for group in graph.groups:
        missing = min(minimum, group.size) - int(alive[group.classes].sum())
        if missing > 0:
            _revive_strongest(alive, group.classes, missing, strength)
            touched.append(group.id)
    return alive, touched


def round_widths(graph: ChannelGraph, alive: np.ndarray, multiple: int) -> np.ndarray:
    """Revive the strongest dead channels until each group's width is a multiple of `multiple` (or full)."""
    if multiple <= 1:
        return alive
    strength, _ = ranking_strength(graph)
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


def write_mask_document(graph: ChannelGraph, alive: np.ndarray, path: str | Path) -> None:
    from onnx_morph.rewrite.save import write_text

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
