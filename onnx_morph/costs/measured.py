"""Measured latency: a table of per-op latencies timed in a runtime at a grid of alive widths.

`onnx-morph profile` writes the table (onnx_morph/profile.py); here it is read, checked against a
model, and interpolated. An op's latency at (A_in, A_out) is bilinear in the grid cell around it
(exact at grid points, clamped outside the grid); ops whose input and output channels are tied (a
depthwise or grouped conv, whose group count follows its channels) have a one-dimensional grid
over their output width.

An op timed alone, again and again, runs with its weights and input in cache and without its
neighbours; in the whole model the same ops take longer (1.6x the sum on ResNet-50 on 2 cores), and
other ops (pooling, reorders, the session) add a fixed time. So the whole model's latency is
predicted as `scale * sum of the ops' latencies + overhead`, with the two numbers fitted to two
measurements of the whole model made in turns: at full width and with every prunable group halved.
Both are then predicted exactly. Where the fit is degenerate (no prunable group, a scale outside
[0.5, 4], or a negative overhead), the overhead is 0 and the scale is the whole model's latency over
the sum of the ops' at full width.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_morph.errors import OptionError

TABLE_FORMAT = "onnx-morph-latency"
TABLE_VERSION = 1


@dataclass(frozen=True)
class OpTable:
    """One op's grid: widths along each axis and the median latency (seconds) and its noise (MAD)."""

    node: str
    op_type: str
    signature: str
    in_width: int
    out_width: int
    tied: bool
    grid_in: tuple[int, ...]
    grid_out: tuple[int, ...]
    seconds: np.ndarray  # (len(grid_in), len(grid_out)), or (len(grid_out),) when tied
    noise: np.ndarray

    def latency(self, a_in: float, a_out: float) -> float:
        """Interpolated latency at alive widths (a_in, a_out): exact at grid points."""
        return self._interpolate(self.seconds, a_in, a_out)

    def noise_at(self, a_in: float, a_out: float) -> float:
        """The measurements' median absolute deviation, interpolated likewise."""
        return self._interpolate(self.noise, a_in, a_out)

    def _interpolate(self, s: np.ndarray, a_in: float, a_out: float) -> float:
        """Bilinear in the grid cell around (a_in, a_out), clamped to the grid; linear in a_out when tied."""
        if self.tied:
            j, fj = _cell(self.grid_out, a_out)
            return float(s[j] * (1 - fj) + s[min(j + 1, s.shape[0] - 1)] * fj)
        i, fi = _cell(self.grid_in, a_in)
        j, fj = _cell(self.grid_out, a_out)
        i2, j2 = min(i + 1, s.shape[0] - 1), min(j + 1, s.shape[1] - 1)
        top = s[i, j] * (1 - fj) + s[i, j2] * fj
        bottom = s[i2, j] * (1 - fj) + s[i2, j2] * fj
        return float(top * (1 - fi) + bottom * fi)

    def widths(self, axis: str) -> tuple[int, ...]:
        """The grid's widths along 'in' or 'out' (the tied axis lists its output widths for both)."""
        return self.grid_out if self.tied or axis == "out" else self.grid_in

    def to_json(self) -> dict:
        return {"op_type": self.op_type, "signature": self.signature, "in_width": self.in_width,
                "out_width": self.out_width, "tied": self.tied, "in": list(self.grid_in), "out": list(self.grid_out),
                "ms": np.round(self.seconds * 1e3, 6).tolist(), "mad_ms": np.round(self.noise * 1e3, 6).tolist()}


def _cell(grid: tuple[int, ...], value: float) -> tuple[int, float]:
    """Index of the grid cell holding `value` and the fraction across it (clamped to the grid)."""
    if len(grid) == 1:
        return 0, 0.0
    value = min(max(value, grid[0]), grid[-1])
    i = min(bisect.bisect_right(grid, value) - 1, len(grid) - 2)
    return i, (value - grid[i]) / (grid[i + 1] - grid[i])


@dataclass
class LatencyTable:
    """A profile of one model on one runtime: per-op grids and the whole model's measured latency."""

    model: str
    provider: str
    threads: int
    batch: int
    device: str
    runtime: str
    model_seconds: float
    model_noise: float
    ops: dict[str, OpTable]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    scale: float = 1.0
    half_seconds: float | None = None  # the whole model measured with every prunable group halved

    @property
    def name(self) -> str:
        return f"measured {self.provider}"

    @property
    def description(self) -> str:
        return f"{self.provider}, {self.device}, {self.threads} threads, batch {self.batch}"

    @property
    def ops_seconds(self) -> float:
        """Sum of the ops' latencies at their full widths."""
        return float(sum(op.latency(op.in_width, op.out_width) for op in self.ops.values()))

    @property
    def overhead_seconds(self) -> float:
        return self.model_seconds - self.scale * self.ops_seconds

    def op_latency(self, node: str, a_in: float, a_out: float) -> float:
        """The op's predicted share of the whole model: its interpolated latency alone, times the scale."""
        op = self.ops.get(node)
        return 0.0 if op is None else self.scale * op.latency(a_in, a_out)

    def slopes(self, node: str, a_in: int, a_out: int) -> tuple[float, float]:
        """(d latency / d A_in, d latency / d A_out) of the op's share at these widths: backward finite
        differences to the next lower grid width of each axis (0 along an axis with no lower width)."""
        op = self.ops[node]
        value = op.latency(a_in, a_out)
        slopes = []
        for axis, grid in (("in", () if op.tied else op.grid_in), ("out", op.grid_out)):
            width = a_in if axis == "in" else a_out
            lower = [g for g in grid if g < width]
            if not lower:
                slopes.append(0.0)
                continue
            other = op.latency(lower[-1], a_out) if axis == "in" else op.latency(a_in, lower[-1])
            slopes.append(self.scale * (value - other) / (width - lower[-1]))
        return slopes[0], slopes[1]

    def calibrate(self, half_widths: dict[str, tuple[int, int]], half_seconds: float) -> None:
        """Fit the scale to the whole model measured at the ops' `half_widths` (see the module's docstring)."""
        self.half_seconds = half_seconds
        ops_half = sum(op.latency(*half_widths[name]) for name, op in self.ops.items())
        span = self.ops_seconds - ops_half
        scale = (self.model_seconds - half_seconds) / span if span > 0.05 * self.ops_seconds else 0.0
        if not 0.5 <= scale <= 4.0 or self.model_seconds - scale * self.ops_seconds < 0:
            scale = self.model_seconds / self.ops_seconds if self.ops_seconds > 0 else 1.0
        self.scale = scale

    def check(self, graph, provider: str | None = None) -> None:
        """OptionError unless the table was profiled from this model (same ops, same signatures) and,
        when given, on this provider."""
        label = self.source or "latency table"
        if provider is not None and provider != self.provider:
            raise OptionError(f"{label} was profiled on provider '{self.provider}', not '{provider}': profile again")
        expected = timed_ops(graph)
        for node, signature in expected.items():
            op = self.ops.get(node)
            if op is None or op.signature != signature:
                why = "is not in it" if op is None else "has another shape or attributes there"
                raise OptionError(f"{label} does not fit this model: op '{node}' {why} (profiled for another model?)")
        extra = sorted(set(self.ops) - set(expected))
        if extra:
            raise OptionError(f"{label} does not fit this model: it times op '{extra[0]}', which the model lacks")

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "model": self.model, "provider": self.provider,
                "threads": self.threads, "batch": self.batch, "device": self.device, "runtime": self.runtime,
                "unit": "ms", "model_ms": round(self.model_seconds * 1e3, 6),
                "model_mad_ms": round(self.model_noise * 1e3, 6), "ops_ms": round(self.ops_seconds * 1e3, 6),
                "half_ms": None if self.half_seconds is None else round(self.half_seconds * 1e3, 6),
                "scale": self.scale, "overhead_ms": round(self.overhead_seconds * 1e3, 6), "notes": self.notes,
                "ops": {name: op.to_json() for name, op in self.ops.items()}}


def timed_ops(graph) -> dict[str, str]:
    """{node: signature} of the ops a table times: those with a bilinear geometry and a constant weight."""
    return {name: op_signature(graph, name) for name, relation in graph.relations.items()
            if relation.geometry is not None and relation.geometry.weight is not None}


def op_signature(graph, name: str) -> str:
    """A hash of what an op's latency depends on, without the batch: op type, attributes, and the
    shapes of its inputs and output past the first axis."""
    node = graph.nodes[name]
    shapes = graph.model.shapes
    parts = [node.domain, node.op_type,
             sorted(onnx.helper.printable_attribute(a) for a in node.attribute),
             [list(shapes.get(t, ()))[1:] if t else None for t in node.input],
             [list(shapes.get(t, ()))[1:] for t in node.output[:1]],
             [graph.model.dtypes.get(t) for t in node.input[:1]]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def load_table(path: str | Path) -> LatencyTable:
    """Read a table written by `onnx-morph profile`; any defect is a one-line OptionError."""
    label = str(path)
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OptionError(f"{label}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"{label}: not a latency table ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict) or document.get("format") != TABLE_FORMAT:
        raise OptionError(f"{label}: not an onnx-morph latency table (expected \"format\": \"{TABLE_FORMAT}\")")
    try:
        return table_from_json(document, label)
    except (KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"{label}: corrupt latency table ({type(exc).__name__}: {exc})") from None


def table_from_json(document: dict, label: str = "") -> LatencyTable:
    if document.get("version") != TABLE_VERSION or document.get("unit") != "ms":
        raise ValueError(f"version {document.get('version')} in {document.get('unit')}, expected {TABLE_VERSION} in ms")
    ops = {str(name): op_from_json(str(name), entry) for name, entry in document["ops"].items()}
    model_seconds = _positive(document["model_ms"], "model_ms") / 1e3
    return LatencyTable(
        model=str(document["model"]), provider=str(document["provider"]), threads=int(document["threads"]),
        batch=int(document["batch"]), device=str(document["device"]), runtime=str(document.get("runtime", "")),
        model_seconds=model_seconds, model_noise=float(document.get("model_mad_ms", 0.0)) / 1e3,
        ops=ops, source=label, notes=list(document.get("notes", [])), scale=_positive(document["scale"], "scale"),
        half_seconds=None if document.get("half_ms") is None else float(document["half_ms"]) / 1e3)


def op_from_json(name: str, entry: dict) -> OpTable:
    tied = bool(entry["tied"])
    grid_in, grid_out = (tuple(int(w) for w in entry[k]) for k in ("in", "out"))
    seconds = np.asarray(entry["ms"], dtype=np.float64) / 1e3
    noise = np.asarray(entry.get("mad_ms", np.zeros_like(seconds)), dtype=np.float64) / 1e3
    shape = (len(grid_out),) if tied else (len(grid_in), len(grid_out))
    if seconds.shape != shape or noise.shape != shape or not grid_out or not grid_in:
        raise ValueError(f"op '{name}': a grid of {len(grid_in)} x {len(grid_out)} widths with "
                         f"{list(seconds.shape)} latencies")
    for grid in (grid_out,) if tied else (grid_in, grid_out):
        if any(b <= a for a, b in zip(grid, grid[1:])) or grid[0] < 1:
            raise ValueError(f"op '{name}': grid widths must be positive and increasing")
    if not np.isfinite(seconds).all() or (seconds < 0).any():
        raise ValueError(f"op '{name}': latencies must be finite and non-negative")
    return OpTable(name, str(entry["op_type"]), str(entry["signature"]), int(entry["in_width"]),
                   int(entry["out_width"]), tied, grid_in, grid_out, seconds, noise)


def _positive(value, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be positive, not {value}")
    return value
