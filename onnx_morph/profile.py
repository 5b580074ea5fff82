"""`onnx-morph profile`: time every weighted op alone in onnxruntime at a grid of alive widths.

Each op (Conv, ConvTranspose, Gemm, MatMul with a constant weight; depthwise and grouped convs
included) becomes a one-node model with random weights; surgery (the handlers' own pruning rules)
shrinks it to each (A_in, A_out) of the grid, and onnxruntime times it: warm-up runs, then at
least `repeats` runs, the median and the median absolute deviation. Results are cached per op
signature, batch, provider, threads, device and runtime version, so repeated layers and repeated
runs cost nothing. The whole model is timed too, at full width and with every prunable group
halved (in turns); the table maps the sum of the ops' latencies to the whole model's through these
two points (see costs/measured.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_morph.costs.measured import LatencyTable, OpTable, op_from_json, op_signature, timed_ops
from onnx_morph.errors import OptionError
from onnx_morph.graph import ChannelGraph, build_channel_graph, load_model
from onnx_morph.rewrite.surgery.timing import Timing, check_timing, measure_models
from onnx_morph.rewrite.surgery.verify import onnxruntime

CACHE_VERSION = 4


def device_name(provider: str) -> str:
    """The CPU's model name, or the GPU's (from nvidia-smi) for cuda."""
    if provider == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout.strip().splitlines()
            return out[0].strip() if out else "CUDA GPU"
        except (OSError, subprocess.SubprocessError):
            return "CUDA GPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def cache_folder() -> Path:
    """$ONNX_MORPH_CACHE/latency, or ~/.cache/onnx-morph/latency."""
    root = os.environ.get("ONNX_MORPH_CACHE") or Path.home() / ".cache" / "onnx-morph"
    return Path(root) / "latency"


def axis_grid(units: int, max_points: int) -> list[int]:
    """Unit counts to time along one axis: the multiples of 8 (16, 32... for wide axes, so that at most
    `max_points` remain), the full count and the two multiples of 8 below it (the top step), and 8, 16."""
    step = 8
    while units // step > max_points:
        step *= 2
    points = set(range(step, units + 1, step)) | {units, units - 8, units - 16, 8, 16}
    return sorted(p for p in points if 1 <= p <= units)


# --------------------------------------------------------------------------- #
# one op alone
# --------------------------------------------------------------------------- #


def single_op_model(graph: ChannelGraph, name: str) -> onnx.ModelProto:
    """The node alone: its activation input as the graph input, random constants of its other inputs' shapes."""
    node = graph.nodes[name]
    geometry = graph.relations[name].geometry
    shapes, dtypes = graph.model.shapes, graph.model.dtypes
    rng = np.random.default_rng(0)
    constants = []
    for tensor in dict.fromkeys(t for t in node.input if t and t != geometry.input):
        dtype = helper.tensor_dtype_to_np_dtype(dtypes.get(tensor, onnx.TensorProto.FLOAT))
        constants.append(numpy_helper.from_array((0.1 * rng.standard_normal(shapes[tensor])).astype(dtype), tensor))
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = name
    del copy.output[1:]
    x = helper.make_tensor_value_info(geometry.input, dtypes.get(geometry.input, 1), shapes[geometry.input])
    y = helper.make_tensor_value_info(node.output[0], dtypes.get(node.output[0], 1), shapes[node.output[0]])
    model = helper.make_model(helper.make_graph([copy], "probe", [x], [y], constants),
                              opset_imports=[helper.make_opsetid("", graph.model.opset)])
    model.ir_version = min(graph.model.model.ir_version or 8, 10)
    return model


@dataclass
class _Probe:
    """A one-node model and its channel units: classes in the order they first appear along each axis."""

    graph: ChannelGraph
    model: onnx.ModelProto
    name: str
    in_units: np.ndarray
    out_units: np.ndarray
    tied: bool

    @classmethod
    def of(cls, graph: ChannelGraph, name: str) -> "_Probe":
        model = single_op_model(graph, name)
        probe_graph = build_channel_graph(load_model(model))
        geometry = probe_graph.relations[name].geometry
        in_classes = probe_graph.axis_classes(geometry.input, geometry.in_axis)
        out_classes = probe_graph.axis_classes(geometry.output, geometry.out_axis)
        in_units, out_units = _ordered_unique(in_classes), _ordered_unique(out_classes)
        tied = np.intersect1d(in_units, out_units).size > 0
        return cls(probe_graph, model, name, in_units, out_units, tied)

    def alive(self, k_in: int, k_out: int) -> np.ndarray:
        alive = np.ones(self.graph.num_classes, dtype=bool)
        if self.tied:
            alive[self.out_units[k_out:]] = False
        else:
            alive[self.in_units[k_in:]] = False
            alive[self.out_units[k_out:]] = False
        return alive

    def widths(self, alive: np.ndarray) -> tuple[int, int]:
        geometry = self.graph.relations[self.name].geometry
        count = lambda t, axis: int(alive[self.graph.axis_classes(t, axis)].sum())  # noqa: E731
        return count(geometry.input, geometry.in_axis), count(geometry.output, geometry.out_axis)

    def shrunk(self, alive: np.ndarray) -> tuple[onnx.ModelProto, np.ndarray]:
        """The model at these alive classes (the surgery of `prune`), and the input's keep mask."""
        from onnx_morph.rewrite.surgery.surgery import remove_channels

        geometry = self.graph.relations[self.name].geometry
        model = remove_channels(self.graph, alive, self.model).model
        keep = alive[self.graph.axis_classes(geometry.input, geometry.in_axis)]
        model.graph.input[0].type.tensor_type.shape.dim[geometry.in_axis].dim_value = int(keep.sum())
        model.graph.output[0].type.tensor_type.ClearField("shape")
        return model, keep


def monotone(seconds: np.ndarray) -> np.ndarray:
    """The medians made non-decreasing in both widths: a narrower op is never slower, and a point out of
    line (a busy moment, a kernel quirk the pruner should not bet on) is pooled with its neighbours
    (isotonic regression along each axis, twice, then a running maximum to settle what is left)."""
    values = np.array(seconds, dtype=np.float64)
    for _ in range(2):
        for axis in (1, 0):
            values = np.apply_along_axis(_isotonic, axis, values)
    return np.maximum.accumulate(np.maximum.accumulate(values, axis=1), axis=0)


def _isotonic(values: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest to `values` in least squares."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count), blocks[-1][1] + count]
    return np.concatenate([np.full(int(c), m) for m, c in blocks])


def _pinned(graph: ChannelGraph, tensor: str, axis: int) -> bool:
    """Whether no channel along this axis can ever be removed in the model (an input, an output): one width to time."""
    classes = graph.axis_classes(tensor, axis) if tensor in graph.tensors else None
    return classes is None or bool(graph.class_pinned()[classes].all())


def _ordered_unique(classes: np.ndarray | None) -> np.ndarray:
    if classes is None:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(classes, return_index=True)
    return classes[np.sort(first)]


def fixed_axes(graph: ChannelGraph, name: str) -> tuple[bool, bool]:
    """Whether the op's input and output widths can never change in this model (graph inputs, outputs, pins)."""
    geometry = graph.relations[name].geometry
    return _pinned(graph, geometry.input, geometry.in_axis), _pinned(graph, geometry.output, geometry.out_axis)


def call_overhead(timing: Timing) -> float:
    """Median seconds of running a session that does nothing (an Identity of one number): the cost of
    a call, which an op timed alone pays once per run and the whole model once in all."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = timing.session(model)
    return Timing(warmup=5, repeats=50).time(session, {"x": np.zeros(1, np.float32)})[0]


def measure_op(graph: ChannelGraph, name: str, timing: Timing, max_points: int, call: float = 0.0) -> OpTable:
    """Time one op alone at every width of its grid (one width along an axis that cannot shrink), less
    the cost of a call."""
    probe = _Probe.of(graph, name)
    geometry = graph.relations[name].geometry
    x_name = geometry.input
    dtype = helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(x_name, onnx.TensorProto.FLOAT))
    x_full = np.random.default_rng(1).standard_normal(graph.model.shapes[x_name]).astype(dtype)
    tied = probe.tied or probe.in_units.size == 0 or probe.out_units.size == 0
    if tied:
        k_out = axis_grid(probe.out_units.size, 3 * max_points) if probe.out_units.size else [0]
        points = [[(k, k) for k in k_out]]
    else:
        fixed_in, fixed_out = fixed_axes(graph, name)
        k_in = [probe.in_units.size] if fixed_in else axis_grid(probe.in_units.size, max_points)
        k_out = [probe.out_units.size] if fixed_out else axis_grid(probe.out_units.size, max_points)
        points = [[(i, o) for o in k_out] for i in k_in]
    seconds = np.zeros((len(points), len(points[0])))
    noise = np.zeros_like(seconds)
    widths = np.zeros(seconds.shape + (2,), dtype=np.int64)
    for r, row in enumerate(points):
        for c, (k_in_, k_out_) in enumerate(row):
            alive = probe.alive(k_in_, k_out_)
            model, keep = probe.shrunk(alive)
            feeds = {x_name: np.ascontiguousarray(np.compress(keep, x_full, axis=geometry.in_axis))}
            median, noise[r, c] = timing.time(timing.session(model), feeds)
            seconds[r, c] = max(median - call, 0.0)
            widths[r, c] = probe.widths(alive)
    grid_in = tuple(int(w) for w in (widths[0, :, 0] if tied else widths[:, 0, 0]))
    grid_out = tuple(int(w) for w in widths[0, :, 1])
    full_in, full_out = probe.widths(np.ones(probe.graph.num_classes, dtype=bool))
    seconds = monotone(seconds)
    return OpTable(name, graph.nodes[name].op_type, op_signature(graph, name), full_in, full_out, tied,
                   grid_in, grid_out, seconds[0] if tied else seconds, noise[0] if tied else noise)


# --------------------------------------------------------------------------- #
# the whole model
# --------------------------------------------------------------------------- #


def load_at_batch(model, input_shapes: dict[str, tuple[int, ...]] | None, batch: int):
    """The model loaded with the first axis of every input set to `batch`."""
    loaded = load_model(model, input_shapes)
    if batch != 1 or any(s and s[0] != batch for s in loaded.input_shapes.values()):
        shapes = {name: (batch, *shape[1:]) for name, shape in loaded.input_shapes.items() if shape}
        loaded = load_model(loaded.model if loaded.base_dir is None else model, {**(input_shapes or {}), **shapes})
    return loaded


# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #


def profile(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    timing: Timing = Timing(),
    max_points: int = 10,
    cache: Path | None = None,
    progress: TextIO | None = sys.stderr,
) -> LatencyTable:
    """The latency table of `model`: every weighted op at a grid of widths, and the whole model.

    Each axis's grid holds up to `max_points` widths (plus the full width and the top step);
    results are cached in `cache` (default: cache_folder()); `progress` gets a line per measured op.
    """
    check_timing(timing)
    if max_points < 1:
        raise OptionError(f"max_points must be at least 1, not {max_points}")
    started = time.perf_counter()
    loaded = load_at_batch(model, input_shapes, timing.batch)
    graph = build_channel_graph(loaded)
    folder = cache if cache is not None else cache_folder()
    device = device_name(timing.provider)
    env = _environment(timing, device, max_points)
    ops, measured = _op_tables(graph, timing, max_points, folder, env, progress)
    whole_key = _model_key(graph)
    whole = _cached_value(folder, whole_key, env)
    half = uniform_half(graph)
    if whole is None:
        whole = _measure_whole(graph, half, timing)
        _store_value(folder, whole_key, env, list(whole))
    result = LatencyTable(loaded.source, timing.provider, timing.threads, timing.batch, device,
                          f"onnxruntime {onnxruntime().__version__}", float(whole[0]), float(whole[1]), ops)
    result.calibrate(_half_widths(graph, half, ops), float(whole[2]))
    _say(progress, f"profile: {len(ops)} ops ({measured} measured, {len(ops) - measured} repeated or cached), "
                   f"model {1e3 * result.model_seconds:.3f} ms, ops {1e3 * result.ops_seconds:.3f} ms, "
                   f"in {time.perf_counter() - started:.1f} s")
    return result


def _op_tables(graph: ChannelGraph, timing: Timing, max_points: int, folder: Path, env: str,
               progress: TextIO | None) -> tuple[dict[str, OpTable], int]:
    """Every timed op's table, from this run (a repeated layer), the cache, or a measurement; and how
    many were measured."""
    ops: dict[str, OpTable] = {}
    by_signature: dict[str, OpTable] = {}
    names = list(timed_ops(graph))
    call, measured = None, 0
    for index, name in enumerate(names, 1):
        signature = op_signature(graph, name) + "/" + "".join("01"[f] for f in fixed_axes(graph, name))
        table = by_signature.get(signature) or _cached(folder, signature, env, name)
        if table is None:
            started = time.perf_counter()
            call = call_overhead(timing) if call is None else call
            table = measure_op(graph, name, timing, max_points, call)
            _store(folder, signature, env, table)
            measured += 1
            _say(progress, f"profile: [{index}/{len(names)}] {name} ({table.op_type}, {table.in_width} -> "
                           f"{table.out_width}, {table.seconds.size} widths) {time.perf_counter() - started:.1f} s")
        by_signature[signature] = table
        ops[name] = replace(table, node=name)
    return ops, measured


def uniform_half(graph: ChannelGraph) -> np.ndarray:
    """Alive classes with every prunable group cut to half its width (rounded up to a multiple of 8)."""
    alive = np.ones(graph.num_classes, dtype=bool)
    for group in graph.groups:
        if group.prunable and group.size > 1:
            half = -(-group.size // 2)
            keep = min(group.size, -(-half // 8) * 8) if group.size >= 16 else half
            alive[group.classes[keep:]] = False
    return alive


def _half_widths(graph: ChannelGraph, alive: np.ndarray, ops: dict[str, OpTable]) -> dict[str, tuple[int, int]]:
    from onnx_morph.costs.resources import alive_along

    widths = {}
    for name in ops:
        geometry = graph.relations[name].geometry
        widths[name] = (int(alive_along(graph, alive, geometry.input, geometry.in_axis).sum()),
                        int(alive_along(graph, alive, geometry.output, geometry.out_axis).sum()))
    return widths


def _measure_whole(graph: ChannelGraph, half: np.ndarray, timing: Timing) -> tuple[float, float, float]:
    """(median, MAD) of the whole model and the median with every group halved, timed in turns."""
    from onnx_morph.rewrite.surgery.surgery import remove_channels

    original = graph.model.materialized()
    models = [original]
    if not half.all():
        models.append(remove_channels(graph, half, original).model)
    shapes = graph.model.input_shapes
    results = measure_models(models, shapes, graph.model.dtypes, timing)
    return results[0].median, results[0].mad, results[-1].median


def _say(stream: TextIO | None, line: str) -> None:
    if stream is not None:
        print(line, file=stream, flush=True)


def _environment(timing: Timing, device: str, max_points: int) -> str:
    return json.dumps([CACHE_VERSION, timing.provider, timing.threads, timing.batch, timing.warmup, timing.repeats,
                       device, onnxruntime().__version__, max_points])


def _key(kind: str, signature: str, env: str) -> str:
    return hashlib.sha256(f"{kind}|{signature}|{env}".encode()).hexdigest()[:32]


def _model_key(graph: ChannelGraph) -> str:
    """Nodes and input shapes, not weights: what the whole model's latency depends on."""
    digest = hashlib.sha256()
    for node in graph.model.graph.node:
        digest.update(node.SerializeToString())
    digest.update(json.dumps(sorted((k, list(v)) for k, v in graph.model.input_shapes.items())).encode())
    return digest.hexdigest()[:32]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a missing or damaged cache entry is measured again


def _write_json(path: Path, value) -> None:
    from onnx_morph.rewrite.surgery.save import write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(value), path)
    except (OSError, OptionError):
        pass  # a cache that cannot be written only costs time


def _cached(folder: Path, signature: str, env: str, name: str) -> OpTable | None:
    document = _read_json(folder / f"{_key('op', signature, env)}.json")
    if not isinstance(document, dict):
        return None
    try:
        return op_from_json(name, document)
    except (KeyError, TypeError, ValueError):
        return None


def _store(folder: Path, signature: str, env: str, table: OpTable) -> None:
    _write_json(folder / f"{_key('op', signature, env)}.json", table.to_json())


def _cached_value(folder: Path, key: str, env: str):
    value = _read_json(folder / f"{_key('model', key, env)}.json")
    return value if isinstance(value, list) and len(value) == 3 else None


def _store_value(folder: Path, key: str, env: str, value) -> None:
    _write_json(folder / f"{_key('model', key, env)}.json", value)
