"""Training to a cost target instead of a strength (MorphNet's most asked question is which strength to use).

The strength is adapted online from the gap between the effective cost and the target, on a log
scale: after every step, with g = clip(log(cost / target) / 0.1, -1, 1) (full speed 10% away from
the target), log s += 0.05 * g above the target and 0.25 * g below it, within [s0 / 100, s0 * 1000]
of the starting strength s0. Channels keep dying for a while after the strength drops (the
optimizer's momentum), so it backs off five times faster than it grows. At the end the structure
is put at the target: the weakest alive channels go while it is above; while it is below, the
strongest channels that fell under the threshold come back as long as the cost stays within it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_morph.errors import OptionError

GAIN = 0.05
BACK_OFF = 0.25
SCALE = 0.1
RANGE = (1e-2, 1e3)


@dataclass
class StrengthController:
    """The strength for the next step, given the effective cost of the last one."""

    strength: float
    target: float
    gain: float = GAIN
    back_off: float = BACK_OFF

    def __post_init__(self) -> None:
        if not (self.target > 0 and math.isfinite(self.target)):
            raise OptionError(f"the cost target must be a finite number > 0, not {self.target}")
        if not (self.strength > 0 and math.isfinite(self.strength)):
            raise OptionError(f"a cost target needs a starting strength > 0, not {self.strength}")
        self.low, self.high = self.strength * RANGE[0], self.strength * RANGE[1]

    def __call__(self, step: int) -> float:
        return self.strength

    def update(self, cost: float) -> float:
        if cost > 0 and math.isfinite(cost):
            gap = max(-1.0, min(1.0, math.log(cost / self.target) / SCALE))
            rate = self.gain if gap > 0 else self.back_off
            self.strength = min(self.high, max(self.low, self.strength * math.exp(rate * gap)))
        return self.strength


def cost_target(resource: str, total: float, *, ratio: float | None = None, flops: float | None = None,
                params: float | None = None, latency: float | None = None) -> float | None:
    """The target in the regularized resource's units: `ratio` of `total`, or an absolute amount of
    the resource the artifacts were regularized for (flops, params or latency in seconds)."""
    given = {k: v for k, v in (("ratio", ratio), ("flops", flops), ("params", params), ("latency", latency))
             if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise OptionError(f"give one cost target, not {', '.join(given)}")
    (kind, value), = given.items()
    if kind == "ratio":
        if not 0 < value <= 1:
            raise OptionError(f"the target ratio is the fraction of the cost to keep, in (0, 1], not {value}")
        return value * total
    if resource.split(":")[0] != kind:
        raise OptionError(f"the artifacts are regularized for {resource}, so they reach {resource} targets; "
                          f"regenerate them with cost {kind} for a {kind} target, or give a ratio")
    if not value > 0:
        raise OptionError(f"the {kind} target must be positive, not {value}")
    return float(value)


def structure_at(target: float, kept: np.ndarray, vector: np.ndarray, prunable: np.ndarray,
                 groups: list[np.ndarray], cost) -> np.ndarray:
    """`kept` moved to the target: above it, its weakest prunable channels (by `vector`) removed until
    `cost(kept) <= target`, every group keeping its strongest channel; below it, the strongest
    removed channels restored while the cost stays within the target. Bisection over the count."""
    if cost(kept) > target:
        order = np.flatnonzero(kept & prunable)
        order = order[np.argsort(vector[order], kind="stable")]
        count = _first_count(len(order), lambda n: cost(_changed(kept, order[:n], False, groups, vector)) <= target)
        return _changed(kept, order[:count], False, groups, vector)
    order = np.flatnonzero(~kept & prunable)
    order = order[np.argsort(-vector[order], kind="stable")]
    over = _first_count(len(order) + 1, lambda n: n > len(order) or cost(_changed(kept, order[:n], True, groups, vector)) > target)
    return _changed(kept, order[:max(over - 1, 0)], True, groups, vector)


def _first_count(limit: int, holds) -> int:
    """The least n in [0, limit] for which `holds(n)`, given it holds from some n on (bisection)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _changed(kept: np.ndarray, classes: np.ndarray, value: bool, groups, vector: np.ndarray) -> np.ndarray:
    trial = kept.copy()
    trial[classes] = value
    for members in groups:
        if members.size and not trial[members].any():
            trial[members[np.argmax(vector[members])]] = True
    return trial
