"""`onnx-morph prune` run through the installed console script: the report (before/after FLOPs and
parameters, per-layer widths, verification), the written model, and exit code 2 with a one-line
`onnx-morph: error: ...` (never a traceback, never an output file) for every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tools import zoo

from onnx_morph.report import human
from onnx_morph.rewrite import Budget, Threshold, prune
from cli_checks import assert_user_error

SCRIPT = Path(sys.executable).parent / "onnx-morph"


def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_usage_error(proc, *fragments: str) -> str:
    """argparse's own errors: exit 2, usage then `onnx-morph prune: error: ...`, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("onnx-morph prune: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def ort_outputs(model, x: np.ndarray) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prune_cli")


@pytest.fixture(scope="module")
def model(workdir) -> Path:
    factory, shape = zoo.ZOO["BasicBlock"]
    return zoo.export_onnx(factory(), shape, workdir / "src" / "basicblock.onnx")


@pytest.fixture(scope="module")
def dense(workdir) -> Path:
    factory, shape = zoo.ZOO["DenseBlock"]
    return zoo.export_onnx(factory(), shape, workdir / "src" / "dense.onnx")


def test_console_script_is_installed():
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}"


# --------------------------------------------------------------------------- #
# Successful runs
# --------------------------------------------------------------------------- #


def check_report(stdout: str, out: Path, result, verified: bool = True) -> None:
    b, a = result.before, result.after
    lines = stdout.splitlines()
    assert lines[0] == f"wrote {out}: removed {result.removed_channels} channels"
    assert re.search(rf"^FLOPs\s+{re.escape(human(b.flops))} ->\s+{re.escape(human(a.flops))}  "
                     rf"\({100 * a.flops / b.flops:.1f}%\)$", stdout, re.M), stdout
    assert re.search(rf"^params\s+{re.escape(human(b.params))} ->\s+{re.escape(human(a.params))}  "
                     rf"\({100 * a.params / b.params:.1f}%\)$", stdout, re.M), stdout
    for note in result.notes:
        assert f"note: {note}" in lines
    changed = sum(w.after != w.before for w in result.widths)
    assert f"layer widths ({changed} of {len(result.widths)} changed)" in lines
    assert re.search(r"^node\s+type\s+before\s+after$", stdout, re.M), stdout
    for w in result.widths:
        assert re.search(rf"^{re.escape(w.node)}\s+{w.op_type}\s+{w.before}\s+{w.after}$", stdout, re.M), (w, stdout)
    if verified:
        m = re.search(r"^verification against the original with the removed channels masked \(2 fresh random inputs\): "
                      r"max abs (\S+), max rel (\S+)$", stdout, re.M)
        assert m, stdout
        assert float(m.group(2)) < 1e-4
        assert re.search(r"^difference from the unpruned original: max abs \S+, max rel \S+$", stdout, re.M), stdout
    else:
        assert lines[-1] == "verification: skipped"


# (flags, the criterion they make, prune()'s other options)
CRITERIA = {
    "ratio": (["--ratio", "0.5"], Budget(ratio=0.5), {}),
    "gamma": (["--gamma-threshold", "0.9"], Threshold(gamma=0.9), {}),
    "weight": (["--weight-threshold", "0.07"], Threshold(weight=0.07), {}),
    "target_flops": (["--target-flops", "300000"], Budget(flops=300000.0), {}),
    "target_params": (["--target-params", "2500"], Budget(params=2500.0), {}),
    "round_to": (["--ratio", "0.5", "--round-to", "4"], Budget(ratio=0.5, round_to=4), {}),
    "no_verify": (["--ratio", "0.5", "--no-verify"], Budget(ratio=0.5), {"verify": False}),
}


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_prune_report_and_output(criterion, model, tmp_path):
    args, chosen, options = CRITERIA[criterion]
    out = tmp_path / "pruned.onnx"
    proc = run("prune", model, "-o", out, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr == ""

    expected = prune(model, chosen, **options)
    check_report(proc.stdout, out, expected, verified=options.get("verify", True))
    assert expected.removed_channels > 0
    if isinstance(chosen, Budget) and chosen.flops is not None:
        assert expected.after.flops <= chosen.flops
    if isinstance(chosen, Budget) and chosen.params is not None:
        assert expected.after.params <= chosen.params

    assert sorted(os.listdir(tmp_path)) == ["pruned.onnx"]
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert written.SerializeToString() == expected.model.SerializeToString()
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (y,) = ort_outputs(written, x)
    assert y.shape == (1, 16, 8, 8)


def test_relative_paths_and_cwd(model, tmp_path):
    shutil.copy(model, tmp_path / "m.onnx")
    proc = run("prune", "m.onnx", "-o", "small.onnx", "--ratio", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("wrote small.onnx: removed ")
    onnx.checker.check_model(onnx.load(str(tmp_path / "small.onnx")))


def test_note_when_the_threshold_would_empty_a_group(model, tmp_path):
    from onnx_morph.graph import build_channel_graph, load_model
    from onnx_morph.rewrite.surgery.select import ranking_strength

    graph = build_channel_graph(load_model(model))
    strength, _ = ranking_strength(graph)
    group_max = sorted(float(strength[g.classes].max()) for g in graph.groups
                       if g.prunable and np.isfinite(strength[g.classes]).all())
    out = tmp_path / "p.onnx"
    proc = run("prune", model, "-o", out, "--gamma-threshold", repr(group_max[0]))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^note: 1 groups would lose every channel; each keeps its strongest one$", proc.stdout, re.M), \
        proc.stdout
    assert out.is_file()


def test_input_shape_fixes_a_dynamic_batch(tmp_path):
    factory, shape = zoo.ZOO["ConvStack"]
    src = zoo.export_onnx(factory(), shape, tmp_path / "dyn.onnx", dynamic_batch=True)
    out = tmp_path / "dyn_pruned.onnx"
    proc = run("prune", src, "-o", out, "--ratio", "0.5", "--input-shape", "input=2,3,16,16")
    assert proc.returncode == 0, proc.stderr
    check_report(proc.stdout, out, prune(src, Budget(ratio=0.5), input_shapes={"input": (2, 3, 16, 16)}))
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (y,) = ort_outputs(out, x)
    assert y.shape == (2, 16, 8, 8)


def test_structure_then_mask_equals_threshold(dense, tmp_path):
    structure = tmp_path / "s.json"
    proc = run("analyze", dense, "--gamma-threshold", "0.9", "--structure", structure)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(structure.read_text())
    by_mask, by_threshold = tmp_path / "mask.onnx", tmp_path / "thr.onnx"
    a = run("prune", dense, "-o", by_mask, "--mask", structure)
    b = run("prune", dense, "-o", by_threshold, "--gamma-threshold", "0.9")
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert by_mask.read_bytes() == by_threshold.read_bytes()
    assert a.stdout.replace(str(by_mask), "X") == b.stdout.replace(str(by_threshold), "X")
    rows = dict(re.findall(r"^(\S+)\s+\S+\s+\d+\s+(\d+)$", a.stdout, re.M))
    assert {k: int(v) for k, v in rows.items()} == doc["structure"]
    assert "removed 0 channels" not in a.stdout


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def _mask(folder: Path, model: Path, edit) -> Path:
    from onnx_morph.graph import build_channel_graph, load_model
    from onnx_morph.rewrite.surgery.select import mask_document

    graph = build_channel_graph(load_model(model))
    doc = mask_document(graph, np.ones(graph.num_classes, dtype=bool))
    tensor = next(iter(doc["masks"]))
    text = edit(doc, tensor)
    path = folder / f"mask{len(list(folder.iterdir()))}.json"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


def _set(doc, key, value):
    doc[key] = value
    return doc


def _set_mask(doc, tensor, value):
    doc["masks"][tensor] = value
    return doc


MASK_EDITS = {
    "not_json": (lambda d, t: "{not json", "not valid JSON"),
    "wrong_format": (lambda d, t: _set(d, "format", "morphnet"), "not an onnx-morph mask file"),
    "unknown_tensor": (lambda d, t: _set_mask(d, "nope", [1]), "tensor 'nope' is not an activation"),
    "wrong_length": (lambda d, t: _set_mask(d, t, d["masks"][t][:-1]), "must be a list of"),
    "non_binary": (lambda d, t: _set_mask(d, t, [2] * len(d["masks"][t])), "zeros and ones"),
    "pinned": (lambda d, t: _set_mask(d, "input", [1, 0, 1]), "removes a pinned channel (graph input 'input')"),
}

# (id, args after `prune MODEL -o OUT`, fragments)
ERRORS = [
    ("ratio_too_big", ["--ratio", "1.5"], ["--ratio is the fraction of FLOPs to keep, in (0, 1], not 1.5"]),
    ("ratio_zero", ["--ratio", "0"], ["--ratio", "not 0.0"]),
    ("ratio_nan", ["--ratio", "nan"], ["--ratio"]),
    ("negative_flops", ["--target-flops", "-5"], ["--target-flops must be positive, not -5.0"]),
    ("negative_params", ["--target-params", "-1"], ["--target-params must be positive"]),
    ("flops_below_floor", ["--target-flops", "1"], ["the flops budget 1 is below", "the least this model can reach"]),
    ("params_below_floor", ["--target-params", "1"], ["the params budget 1 is below"]),
    ("threshold_kills_all", ["--gamma-threshold", "1e9"], ["the threshold removes every prunable channel"]),
    ("negative_threshold", ["--gamma-threshold", "-1"], ["finite number >= 0"]),
    ("inf_threshold", ["--weight-threshold", "inf"], ["finite number >= 0"]),
    ("round_to_zero", ["--ratio", "0.5", "--round-to", "0"], ["--round-to must be at least 1, not 0"]),
    ("threshold_round_to_zero", ["--gamma-threshold", "0.5", "--round-to", "0"], ["--round-to must be at least 1"]),
    ("min_keep_too_big", ["--ratio", "0.5", "--min-keep", "2"],
     ["--min-keep is a fraction of each group's channels, in [0, 1], not 2.0"]),
    ("latency_without_table", ["--target-latency", "0.5"], ["--target-latency needs --latency-table"]),
    ("bad_input_shape", ["--ratio", "0.5", "--input-shape", "nope=1,2"], []),
    ("missing_mask", ["--mask", "{tmp}/absent.json"], ["absent.json: no such file"]),
] + [(f"mask_{k}", ["--mask", f"{{mask:{k}}}"], [v[1]]) for k, v in MASK_EDITS.items()]


def _expand(args, tmp_path, model):
    out = []
    for a in args:
        if a.startswith("{mask:"):
            kind = a[len("{mask:"):-1]
            masks = tmp_path / "masks"
            masks.mkdir(exist_ok=True)
            out.append(str(_mask(masks, model, MASK_EDITS[kind][0])))
        else:
            out.append(a.replace("{tmp}", str(tmp_path)))
    return out


def test_errors(model, tmp_path):
    """Every case in parallel; each gets its own empty output folder that must stay empty."""
    before = model.read_bytes()
    jobs = []
    for name, args, fragments in ERRORS:
        folder = tmp_path / name
        folder.mkdir()
        jobs.append((name, folder, _expand(args, folder, model), fragments))
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(pool.map(lambda job: run("prune", model, "-o", job[1] / "p.onnx", *job[2]), jobs))
    failures = []
    for (name, folder, _, fragments), proc in zip(jobs, procs):
        try:
            assert_user_error(proc, *fragments)
            leftovers = [p.name for p in folder.iterdir() if p.name != "masks"]
            assert leftovers == [], leftovers
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
    assert model.read_bytes() == before


@pytest.mark.parametrize("args,fragment", [
    ([], "one of the arguments --gamma-threshold --weight-threshold --mask --target-flops --target-params --ratio --target-latency "
         "is required"),
    (["--ratio", "0.5", "--gamma-threshold", "0.1"], "not allowed with argument"),
    (["--ratio", "half"], "argument --ratio: invalid float value: 'half'"),
    (["--ratio", "0.5", "--round-to", "2.5"], "argument --round-to: invalid int value: '2.5'"),
])
def test_usage_errors(args, fragment, model, tmp_path):
    out = tmp_path / "p.onnx"
    assert_usage_error(run("prune", model, "-o", out, *args), fragment)
    assert not out.exists()


def test_missing_output_option(model):
    assert_usage_error(run("prune", model, "--ratio", "0.5"), "the following arguments are required: -o/--output")


def test_output_equal_to_input(model, tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copy(model, src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    assert_user_error(run("prune", src, "-o", src, "--ratio", "0.5"), "refusing to overwrite the input model")
    assert_user_error(run("prune", "m.onnx", "-o", "./sub/../m.onnx", "--ratio", "0.5", cwd=tmp_path),
                      "refusing to overwrite")
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "sub"]


def test_output_folder_missing(model, tmp_path):
    assert_user_error(run("prune", model, "-o", tmp_path / "nope" / "p.onnx", "--ratio", "0.5"), "does not exist")
    assert os.listdir(tmp_path) == []


def test_output_is_a_folder(model, tmp_path):
    (tmp_path / "p.onnx").mkdir()
    assert_user_error(run("prune", model, "-o", tmp_path / "p.onnx", "--ratio", "0.5"), "cannot write")
    assert os.listdir(tmp_path) == ["p.onnx"]


@pytest.mark.parametrize("content", [None, b"", b"\x08\x07not a model at all"])
def test_bad_model_file(content, tmp_path):
    src = tmp_path / "bad.onnx"
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    line = assert_user_error(run("prune", src, "-o", out / "p.onnx", "--ratio", "0.5"))
    assert str(src) in line
    assert os.listdir(out) == []


def test_mask_emptying_a_group_is_a_user_error(model, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = _mask(masks, model, lambda d, t: _set_mask(d, t, [0] * len(d["masks"][t])))
    out = tmp_path / "p.onnx"
    proc = run("prune", model, "-o", out, "--mask", mask)
    assert proc.returncode in (0, 2), (proc.returncode, proc.stderr)  # today: -8 (SIGFPE), no message
    assert "Traceback" not in proc.stderr
    if proc.returncode == 2:
        assert_user_error(proc)
        assert not out.exists()


# --------------------------------------------------------------------------- #
# BatchNorm calibration
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def weak_channels(workdir) -> Path:
    """The example CNN with small but non-zero BatchNorm scales on some channels and shifts away from
    zero: pruning them moves every later BatchNorm's input."""
    import torch

    from onnx_morph.examples import export, small_resnet

    torch.manual_seed(0)
    module = small_resnet(width=16)
    with torch.no_grad():
        norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in norms:
            bn.bias.uniform_(-0.5, 0.5)
            bn.weight[: len(bn.weight) // 4] = 0.02
    return export(module, (1, 1, 28, 28), workdir / "weak.onnx")


def test_calibrate_remeasures_batchnorm_statistics(weak_channels, tmp_path):
    from onnx_morph.data import load_dataset
    from onnx_morph.rewrite.surgery.calibrate import recalibrated_batchnorm

    plain_out, calibrated_out = tmp_path / "plain.onnx", tmp_path / "calibrated.onnx"
    plain = run("prune", weak_channels, "-o", plain_out, "--gamma-threshold", "0.05")
    assert plain.returncode == 0, plain.stderr
    assert re.search(r"^note: the pruned model differs from the original .*--calibrate", plain.stdout, re.M), plain.stdout
    proc = run("prune", weak_channels, "-o", calibrated_out, "--gamma-threshold", "0.05",
               "--calibrate", "digits", "--calibration-images", "200")
    assert proc.returncode == 0, proc.stderr
    assert "note: BatchNorm statistics measured on 200 calibration inputs" in proc.stdout.splitlines()
    assert "--calibrate" not in proc.stdout

    batches = load_dataset("digits").fitted((1, 1, 28, 28)).calibration_batches(200)
    assert [len(b) for b in batches] == [64, 64, 64, 8]
    x = load_dataset("digits").fitted((1, 1, 28, 28)).x_test[:1]
    expected = ort_outputs(recalibrated_batchnorm(onnx.load(plain_out), batches, "input"), x)[0]
    calibrated = ort_outputs(calibrated_out, x)[0]
    uncalibrated = ort_outputs(plain_out, x)[0]
    np.testing.assert_allclose(calibrated, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(calibrated - uncalibrated).max() > 1e-2  # the statistics did change
    stats = {t.name for t in onnx.load(calibrated_out).graph.initializer if t.name.endswith("/running_mean")}
    bn_count = sum(n.op_type == "BatchNormalization" for n in onnx.load(calibrated_out).graph.node)
    assert len(stats) == bn_count > 0


@pytest.mark.parametrize("args, fragments", [
    (["--calibrate", "digits", "--calibration-images", "0"], ["at least one image"]),
    (["--calibrate", "imagenet"], ["unknown data 'imagenet'"]),
    (["--calibrate", "digits", "--mean", "0.5,0.5"], ["mean takes 1 or 3 values (one per input channel), not 2"]),
])
def test_calibrate_errors(args, fragments, model, tmp_path):
    """BasicBlock takes 3-channel images; digits have one channel."""
    out = tmp_path / "pruned.onnx"
    proc = run("prune", model, "-o", out, "--ratio", "0.5", *args)
    assert_user_error(proc, *fragments)
    assert not out.exists()


def test_calibration_of_a_model_without_batchnorm_changes_nothing(workdir, tmp_path):
    factory, shape = zoo.ZOO["TransformerBlock"]
    path = zoo.export_onnx(factory(), shape, workdir / "transformer.onnx")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    plain = prune(path, Budget(ratio=0.6))
    result = prune(path, Budget(ratio=0.6), calibration=[np.repeat(x, 4, axis=0)])
    assert result.notes[-1] == "no BatchNorm to calibrate"
    assert result.model.SerializeToString() == plain.model.SerializeToString()


def test_calibration_refuses_a_non_float_input():
    from onnx import TensorProto, helper

    from onnx_morph.errors import OptionError
    from onnx_morph.rewrite.surgery.calibrate import calibrated

    graph = helper.make_graph([helper.make_node("Identity", ["tokens"], ["y"])], "g",
                              [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])])
    with pytest.raises(OptionError, match="input 'tokens' takes int64"):
        calibrated(helper.make_model(graph), [np.zeros((1, 4), np.float32)])
