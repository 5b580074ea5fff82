"""What `prune` removes: the channels below a threshold, those a mask document drops, or the weakest
ones down to a budget. Each criterion checks its own fields when it is made, and its messages name them
as Python does (`round_to`, `flops`); the CLI shows its flags instead.

This module imports nothing heavy: the CLI reads its defaults while it builds the parser."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Union

from onnx_morph.errors import InvariantError, OptionError

ROUND_TO = 1  # every width may be any number of channels
MIN_KEEP = 0.1  # a budget keeps this fraction of every group: on an untrained model the ranking would empty layers


@dataclass(frozen=True)
class Threshold:
    """Channels whose |BatchNorm scale| (`gamma`) or weight-slice RMS (`weight`) is at most this are dead;
    every group keeps its strongest channel, and widths are rounded up to multiples of `round_to`."""

    gamma: float | None = None
    weight: float | None = None
    round_to: int = ROUND_TO

    def __post_init__(self) -> None:
        _exactly_one(self, ("gamma", "weight"))
        if not math.isfinite(self.value) or self.value < 0:
            raise OptionError(f"the {self.kind} threshold must be a finite number >= 0, not {self.value}")
        _check_round_to(self.round_to)

    @property
    def kind(self) -> str:
        return "gamma" if self.gamma is not None else "weight"

    @property
    def value(self) -> float:
        return self.gamma if self.gamma is not None else self.weight


@dataclass(frozen=True)
class Mask:
    """The channels a mask document keeps (as `analyze --structure`, `train` or `export_structure` write
    it: a dict, or the path of its JSON file); widths are rounded up to multiples of `round_to`."""

    document: dict | str | os.PathLike = field(repr=False)
    round_to: int = ROUND_TO

    def __post_init__(self) -> None:
        if not isinstance(self.document, (dict, str, os.PathLike)):
            raise OptionError(f"a mask is a document (dict) or the path of its JSON file, not "
                              f"{type(self.document).__name__}")
        _check_round_to(self.round_to)


@dataclass(frozen=True)
class Budget:
    """A cost to prune down to: `flops` or `params` (absolute), `ratio` (the fraction of the FLOPs to
    keep) or `latency` (a fraction of the measured original, 0.5, or a time, '3.2ms', predicted by the
    latency table that prune() is given). The weakest channels per unit of cost saved go first, `round_to`
    at a time; every group keeps `min_keep` of its channels."""

    flops: float | None = None
    params: float | None = None
    ratio: float | None = None
    latency: float | str | None = None
    round_to: int = ROUND_TO
    min_keep: float = MIN_KEEP

    def __post_init__(self) -> None:
        _exactly_one(self, ("flops", "params", "ratio", "latency"))
        for name in ("flops", "params"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise OptionError(f"`{name}` must be positive, not {value}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise OptionError(f"`ratio` is the fraction of FLOPs to keep, in (0, 1], not {self.ratio}")
        if self.latency is not None:
            latency_spec(self.latency)
        _check_round_to(self.round_to)
        if not 0 <= self.min_keep <= 1:
            raise OptionError(f"min_keep is a fraction of each group's channels, in [0, 1], not {self.min_keep}")

    @property
    def resource(self) -> str:
        """The cost the budget limits: "flops" (also for `ratio`), "params" or "latency"."""
        return "params" if self.params is not None else "latency" if self.latency is not None else "flops"

    @property
    def target(self) -> float:
        """The absolute FLOPs or parameters to meet (a `ratio` is made absolute with `of_total` first)."""
        value = self.flops if self.flops is not None else self.params
        if value is None:
            raise InvariantError(f"{self} has no absolute target")
        return float(value)

    def of_total(self, flops: float) -> Budget:
        """The same budget with a `ratio` made absolute against the model's `flops`."""
        return self if self.ratio is None else replace(self, flops=self.ratio * flops, ratio=None)


Criterion = Union[Threshold, Mask, Budget]


def latency_spec(target: float | str) -> tuple[float, str | None]:
    """A latency target's value and unit (None: a fraction of the measured original, at most 1)."""
    text = str(target).strip()
    match = re.fullmatch(r"([0-9.eE+-]+)\s*(ms|us|s)?", text)
    try:
        value = float(match.group(1)) if match else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise OptionError(f"`latency` '{text}': give a fraction of the measured latency (0.5) or a time (3.2ms)")
    unit = match.group(2)
    if unit is None and value > 1:
        raise OptionError(f"`latency` {text}: a fraction must be at most 1 (or give a time: {text}ms)")
    return value, unit


def check_criterion(criterion: Criterion, latency_table) -> None:
    """What prune() checks before it reads the model: a criterion it knows, and a table for a latency budget."""
    if not isinstance(criterion, (Threshold, Mask, Budget)):
        raise OptionError(f"the criterion is a Threshold, Mask or Budget, not {type(criterion).__name__}")
    if isinstance(criterion, Budget) and criterion.latency is not None and latency_table is None:
        raise OptionError("`latency` needs latency_table (write one with `onnx-morph profile`)")


def _exactly_one(criterion, names: tuple[str, ...]) -> None:
    given = [n for n in names if getattr(criterion, n) is not None]
    if len(given) != 1:
        options = ", ".join(f"`{n}`" for n in names)
        raise OptionError(f"{type(criterion).__name__}: give exactly one of {options} "
                          f"(got {', '.join(given) or 'none'})")


def _check_round_to(round_to: int) -> None:
    if round_to < 1:
        raise OptionError(f"round_to must be at least 1, not {round_to}")
