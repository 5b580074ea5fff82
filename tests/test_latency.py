"""Measured latency: `profile` times each weighted op at a grid of widths, the table interpolates
(exact at grid points), analyze and prune use it, and a bad table is a one-line error."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_checks import assert_user_error
from onnx_morph.analysis import analyze
from onnx_morph.costs.measured import LatencyTable, OpTable, load_table, table_from_json
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.profile import Timing, axis_grid, profile

SCRIPT = Path(sys.executable).parent / "onnx-morph"
FAST = Timing(warmup=1, repeats=3, min_seconds=0.0)


def small_cnn(width: int = 32, hidden: int = 48, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU, a depthwise conv, a pointwise conv, global pooling and a Gemm head."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_bn_relu(x: str, name: str, cin: int, cout: int, k: int, group: int = 1) -> str:
        w = const(f"{name}.w", rng.standard_normal((cout, cin // group, k, k)) * 0.3)
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}.c"], name=name, pads=[k // 2] * 4, group=group))
        stats = [const(f"{name}.{p}", v) for p, v in (("g", rng.uniform(0.5, 1.5, cout)), ("b", rng.uniform(-.1, .1, cout)),
                                                       ("m", rng.uniform(-.1, .1, cout)), ("v", rng.uniform(.5, 1.5, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.c", *stats], [f"{name}.bn"], name=f"{name}_bn"))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.r"], name=f"{name}_relu"))
        return f"{name}.r"

    x = conv_bn_relu("x", "conv1", 3, width, 3)
    x = conv_bn_relu(x, "dw", width, width, 3, group=width)
    x = conv_bn_relu(x, "pw", width, hidden, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["flat", const("fc.w", rng.standard_normal((hidden, 10)) * 0.1),
                                           const("fc.b", np.zeros(10))], ["y"], name="fc"))
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latency")


@pytest.fixture(scope="module")
def model_path(folder) -> Path:
    path = folder / "small.onnx"
    onnx.save(small_cnn(), path)
    return path


@pytest.fixture(scope="module")
def table_path(folder, model_path) -> Path:
    table = profile(model_path, timing=FAST, max_points=3, cache=folder / "cache", progress=None)
    path = folder / "latency.json"
    path.write_text(json.dumps(table.to_json()))
    return path


def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def test_axis_grid_holds_multiples_of_8_the_full_width_and_its_top_step():
    assert axis_grid(64, 10) == [8, 16, 24, 32, 40, 48, 56, 64]
    wide = axis_grid(1000, 10)
    assert {8, 16, 1000, 992, 984} <= set(wide) and len(wide) <= 15
    assert all(w % 8 == 0 for w in wide if w != 1000)
    assert axis_grid(3, 10) == [3]


def test_profile_times_every_weighted_op_and_caches_them(folder, model_path, table_path):
    table = load_table(table_path)
    assert list(table.ops) == ["conv1", "dw", "pw", "fc"]
    assert (table.provider, table.threads, table.batch) == ("cpu", 2, 1)
    assert table.ops["dw"].tied and not table.ops["pw"].tied
    # Axes that cannot shrink in this model (the input image, the logits) get one width.
    assert table.ops["conv1"].grid_in == (3,) and table.ops["fc"].grid_out == (10,)
    pw = table.ops["pw"]
    assert pw.grid_in[-1] == 32 and pw.grid_out[-1] == 48 and 40 in pw.grid_out and 8 in pw.grid_in
    assert pw.seconds.shape == (len(pw.grid_in), len(pw.grid_out)) and (pw.seconds >= 0).all()
    assert table.model_seconds > 0
    progress = io.StringIO()
    again = profile(model_path, timing=FAST, max_points=3, cache=folder / "cache", progress=progress)
    assert "(0 measured, 4 repeated or cached)" in progress.getvalue()
    np.testing.assert_array_equal(again.ops["pw"].seconds, table.ops["pw"].seconds)


def test_interpolation_is_exact_at_grid_points_and_bilinear_between():
    seconds = np.array([[1.0, 2.0, 4.0], [3.0, 5.0, 9.0]])
    op = OpTable("op", "Conv", "sig", 16, 24, False, (8, 16), (8, 16, 24), seconds, np.zeros_like(seconds))
    for i, a_in in enumerate(op.grid_in):
        for j, a_out in enumerate(op.grid_out):
            assert op.latency(a_in, a_out) == seconds[i, j]
    assert op.latency(12, 20) == pytest.approx((2 + 4 + 5 + 9) / 4)
    assert op.latency(1, 1) == 1.0 and op.latency(99, 99) == 9.0  # clamped to the grid
    tied = OpTable("dw", "Conv", "sig", 24, 24, True, (8, 16, 24), (8, 16, 24), np.array([1.0, 2.0, 6.0]), np.zeros(3))
    assert [tied.latency(w, w) for w in (8, 16, 24, 20)] == [1.0, 2.0, 6.0, 4.0]


def test_profiled_table_reproduces_its_measurements_at_grid_points(table_path):
    document = json.loads(table_path.read_text())
    table = load_table(table_path)
    for name, entry in document["ops"].items():
        op = table.ops[name]
        for i, a_in in enumerate(op.grid_in if not op.tied else [None]):
            for j, a_out in enumerate(op.grid_out):
                expected = entry["ms"][j] if op.tied else entry["ms"][i][j]
                assert 1e3 * op.latency(a_in or 0, a_out) == pytest.approx(expected, rel=1e-12)


def test_analyze_with_a_measured_table(model_path, table_path):
    table = load_table(table_path)
    full = analyze(model_path, cost=f"latency:measured={table_path}")
    assert full.total.latency_s == pytest.approx(table.model_seconds, rel=1e-9)  # exact at full width
    assert sum(op.latency_s for op in full.ops) == pytest.approx(table.scale * table.ops_seconds, rel=1e-9)
    dead = analyze(model_path, cost=f"latency:measured={table_path}", gamma_threshold=0.9)
    graph = dead.graph
    expected = table.overhead_seconds
    for op in dead.ops:
        if op.node in table.ops:
            expected += table.scale * table.ops[op.node].latency(op.in_alive, op.out_alive)
    assert dead.effective.latency_s == pytest.approx(expected, rel=1e-9)
    assert dead.effective.latency_s < full.total.latency_s and graph is not None
    proc = run("analyze", model_path, "--cost", f"latency:measured={table_path}")
    assert proc.returncode == 0 and "latency table" in proc.stdout and "measured cpu" in proc.stdout
    report = json.loads(run("analyze", model_path, "--json", "--cost", f"latency:measured={table_path}").stdout)
    assert report["hardware"]["provider"] == "cpu" and report["hardware"]["table"] == str(table_path)
    assert report["total"]["latency_s"] == pytest.approx(table.model_seconds, rel=1e-9)


def test_bad_tables_are_one_line_errors(folder, model_path, table_path):
    document = json.loads(table_path.read_text())
    corrupt = folder / "corrupt.json"
    corrupt.write_text(table_path.read_text()[:200])
    assert_user_error(run("analyze", model_path, "--cost", f"latency:measured={corrupt}"), "not a latency table")
    broken = dict(document, ops={**document["ops"], "pw": {**document["ops"]["pw"], "ms": [[1.0]]}})
    (folder / "broken.json").write_text(json.dumps(broken))
    assert_user_error(run("analyze", model_path, "--cost", f"latency:measured={folder / 'broken.json'}"),
                      "corrupt latency table", "pw")
    other = folder / "other.onnx"
    onnx.save(small_cnn(hidden=40), other)
    assert_user_error(run("analyze", other, "--cost", f"latency:measured={table_path}"), "does not fit this model", "pw")
    assert_user_error(run("analyze", model_path, "--cost", f"latency:measured={folder / 'missing.json'}"), "no such file")


# --------------------------------------------------------------------------- #
# pruning to a latency target
# --------------------------------------------------------------------------- #


def staircase_table(graph, step: int = 16, overhead: float = 1e-4) -> LatencyTable:
    """A synthetic table: every op costs as if its widths were rounded up to multiples of `step`,
    timed at every multiple of 8 (so 8, 24, 40... lie on the flat part of a step)."""
    from onnx_morph.costs.measured import timed_ops

    up = lambda w: -(-w // step) * step  # noqa: E731
    ops = {}
    for name, signature in timed_ops(graph).items():
        geometry = graph.relations[name].geometry
        full_in, full_out = graph.model.shapes[geometry.input][geometry.in_axis], graph.model.shapes[geometry.output][geometry.out_axis]
        pinned_in = graph.class_pinned()[graph.axis_classes(geometry.input, geometry.in_axis)].all()
        pinned_out = graph.class_pinned()[graph.axis_classes(geometry.output, geometry.out_axis)].all()
        grid_in = (full_in,) if pinned_in else tuple(range(8, full_in + 1, 8))
        grid_out = (full_out,) if pinned_out else tuple(range(8, full_out + 1, 8))
        tied = geometry.groups > 1
        if tied:
            seconds = np.array([1e-6 * up(w) for w in grid_out])
        else:
            seconds = np.array([[1e-8 * up(i) * up(o) for o in grid_out] for i in grid_in])
        ops[name] = OpTable(name, graph.nodes[name].op_type, signature, full_in, full_out, tied,
                            grid_out if tied else grid_in, grid_out, seconds, np.zeros_like(seconds))
    total = sum(op.latency(op.in_width, op.out_width) for op in ops.values())
    return LatencyTable("synthetic", "cpu", 2, 1, "test", "", total + overhead, 0.0, ops, source="synthetic")


def test_a_staircase_makes_the_pruner_choose_widths_on_the_step():
    from onnx_morph.rewrite.surgery.latency import LatencyModel, by_latency

    graph = build_channel_graph(load_model(small_cnn(width=64, hidden=96)))
    table = staircase_table(graph)
    model = LatencyModel(graph, table)
    for ratio in (0.8, 0.65, 0.55):
        target = ratio * table.model_seconds
        alive = by_latency(graph, table, target, min_keep=0.1)
        widths = [int(alive[g.classes].sum()) for g in graph.groups if g.prunable]
        assert all(w % 16 == 0 for w in widths), (ratio, widths)
        assert model.predict(alive) <= target
        assert min(widths) < max(g.size for g in graph.groups if g.prunable)


def test_a_latency_target_prune_meets_its_prediction(folder):
    from onnx_morph.rewrite import Budget, prune

    path = folder / "wider.onnx"
    onnx.save(small_cnn(width=64, hidden=128, size=32), path)
    table = profile(path, timing=FAST, max_points=3, cache=folder / "cache", progress=None)
    result = prune(path, Budget(latency=0.6), latency_table=table)
    check = result.latency
    assert check.target_s == pytest.approx(0.6 * table.model_seconds)
    assert check.predicted_before == pytest.approx(table.model_seconds)
    assert check.predicted_after <= check.target_s
    assert check.measured_before > 0 and check.measured_after > 0
    assert 0 < check.fastest_before <= check.measured_before and 0 < check.fastest_after <= check.measured_after
    assert result.after.flops < result.before.flops
    assert result.masked_deviation.max_rel < 1e-4
    fixed = prune(path, Budget(latency=f"{1e3 * 0.6 * table.model_seconds:.6f}ms"), latency_table=table, measure=False)
    assert fixed.latency.measured_after is None
    if any("chose again" in note for note in result.notes):  # the measured model missed: a lower predicted goal,
        # met by a cheaper prediction, not always by fewer channels (the table is a staircase)
        assert result.latency.predicted_after <= fixed.latency.predicted_after
    else:
        np.testing.assert_array_equal(fixed.alive, result.alive)


def test_latency_table_errors_in_prune(folder, model_path, table_path):
    out = folder / "out.onnx"
    assert_user_error(run("prune", model_path, "-o", out, "--target-latency", "0.5"), "--latency-table")
    assert_user_error(run("prune", model_path, "-o", out, "--target-latency", "0.5", "--latency-table", table_path,
                          "--provider", "cuda"), "provider 'cpu'", "not 'cuda'")
    assert_user_error(run("prune", model_path, "-o", out, "--target-latency", "2", "--latency-table", table_path),
                      "at most 1")
    assert_user_error(run("prune", model_path, "-o", out, "--target-latency", "1e-9ms", "--latency-table", table_path),
                      "below")
    other = folder / "other2.onnx"
    onnx.save(small_cnn(width=24), other)
    assert_user_error(run("prune", other, "-o", out, "--ratio", "0.5", "--latency-table", table_path), "does not fit")
    assert not out.exists()


def test_regularizer_latency_slopes_are_finite_differences_of_the_table(model_path, table_path):
    from onnx_morph.costs.terms import cost_terms
    from onnx_morph.rewrite.training.regularizer import build_regularizer

    graph = build_channel_graph(load_model(model_path))
    table = load_table(table_path)
    terms = cost_terms(graph, "latency", hardware=table)
    assert terms.parts == 1 and terms.nodes == list(table.ops)
    for row in terms.rows:
        op = table.ops[row.node]
        w_in, w_out = op.in_width, op.out_width
        below = lambda grid, w: max(g for g in grid if g < w)  # noqa: E731
        expected_out = table.scale * (op.latency(w_in, w_out) - op.latency(w_in, below(op.grid_out, w_out))) / (
            w_out - below(op.grid_out, w_out)) if len(op.grid_out) > 1 else 0.0
        expected_in = 0.0
        if not op.tied and len(op.grid_in) > 1:
            lower = below(op.grid_in, w_in)
            expected_in = table.scale * (op.latency(w_in, w_out) - op.latency(lower, w_out)) / (w_in - lower)
        assert row.in_linear[0] == pytest.approx(expected_in, abs=1e-15)
        assert row.out_linear[0] == pytest.approx(expected_out, abs=1e-15)
        assert row.bilinear[0] == 0.0
    assert table.ops["pw"].grid_out[-2] == 40
    alive = np.ones(graph.num_classes, dtype=bool)
    cost = terms.cost(alive)
    assert cost == pytest.approx(table.model_seconds, rel=1e-9)  # exact at the current widths
    regularizer = build_regularizer(graph, cost=f"latency:measured={table_path}")
    assert regularizer.terms.parts == 1


def test_monotone_keeps_a_staircase_and_pools_a_spike():
    from onnx_morph.profile import monotone

    stairs = np.array([[1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 4.0, 4.0]])
    np.testing.assert_array_equal(monotone(stairs), stairs)
    spiked = monotone(np.array([[1.0, 9.0, 2.0, 3.0]]))
    assert (np.diff(spiked, axis=1) >= 0).all() and spiked[0, -1] < 9.0


def test_profile_command_writes_the_table_and_reads_the_cache_second(folder, model_path):
    import os

    env = {**os.environ, "ONNX_MORPH_CACHE": str(folder / "cli_cache")}
    out = folder / "cli.json"
    first = run("profile", model_path, "-o", out, "--max-points", "2", env=env)
    assert first.returncode == 0, first.stderr
    assert "profile: [1/4] conv1" in first.stderr and "(4 measured" in first.stderr
    assert first.stdout.startswith(f"wrote {out}: 4 ops")
    document = json.loads(out.read_text())
    assert document["format"] == "onnx-morph-latency" and document["provider"] == "cpu"
    assert {"threads", "batch", "device", "model_ms", "scale", "overhead_ms"} <= set(document)
    second = run("profile", model_path, "-o", out, "--max-points", "2", env=env)
    assert "(0 measured, 4 repeated or cached)" in second.stderr
    assert json.loads(out.read_text())["ops"] == document["ops"]
    assert (folder / "cli_cache" / "latency").is_dir()


def test_profile_refuses_a_missing_provider_and_bad_numbers(folder, model_path):
    import onnxruntime as ort

    out = folder / "never.json"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert_user_error(run("profile", model_path, "-o", out, "--provider", "cuda"), "provider 'cuda' is not available")
    assert_user_error(run("profile", model_path, "-o", out, "--threads", "0"), "at least 1")
    assert not out.exists()


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="no CUDAExecutionProvider in this onnxruntime")
def test_profile_on_cuda(folder, model_path):
    table = profile(model_path, timing=Timing(provider="cuda", warmup=1, repeats=3, min_seconds=0.0), max_points=2,
                    cache=folder / "cuda_cache", progress=None)
    assert table.provider == "cuda" and table.model_seconds > 0 and set(table.ops) == {"conv1", "dw", "pw", "fc"}
