"""`onnx-morph analyze` run as a real subprocess, both as `python -m onnx_morph.cli` and through
the installed console script: the text and JSON reports, the cost options, and exit code 2
with a one-line `onnx-morph: error: ...` (never a traceback) for every malformed input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tools import zoo

try:
    from test_load_errors import BAD_SPECS, CASES, build_cases, save_external
except ImportError:  # tests/ turned into a package
    from tests.test_load_errors import BAD_SPECS, CASES, build_cases, save_external

import onnx_morph
from cli_checks import assert_user_error

SCRIPT = Path(sys.executable).parent / "onnx-morph"
RUNNERS = {
    "module": [sys.executable, "-m", "onnx_morph.cli"],
    "script": [str(SCRIPT)],
}


def run(*args, runner: str = "module", cwd: Path | None = None, prefix: list[str] | None = None):
    cmd = (prefix or RUNNERS[runner]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)


def shape_args(input_shapes) -> list[str]:
    args = []
    for name, dims in (input_shapes or {}).items():
        args += ["--input-shape", f"{name}={','.join(str(d) for d in dims)}"]
    return args


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cases(workdir):
    return build_cases(workdir)


@pytest.fixture(scope="module")
def model(workdir) -> Path:
    factory, shape = zoo.ZOO["BasicBlock"]
    return zoo.export_onnx(factory(), shape, workdir / "basicblock.onnx")


@pytest.fixture(scope="module")
def analysis(model):
    return onnx_morph.analyze(model)


@pytest.fixture(scope="module")
def json_report(model):
    proc = run("analyze", model, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_console_script_is_installed():
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}"


# --------------------------------------------------------------------------- #
# Reports
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_text_report(runner, model, analysis, tmp_path):
    from onnx_morph.report import human

    proc = run("analyze", model, runner=runner, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert f"model: {model} (opset {analysis.opset})" in out
    assert re.search(rf"^total\s+FLOPs {re.escape(human(analysis.total.flops))}\s", out, re.M), out
    assert re.search(r"^channel groups: \d+ \(\d+ prunable, \d+ prunable channels\)$", out, re.M), out
    assert re.search(r"^group\s+size\s+alive\s+ops\s+status$", out, re.M), out
    # one table row per group
    rows = re.findall(r"^(\d+)\s+(\d+)\s+(\d+)\s+.*\s(prunable|pinned: .*)$", out, re.M)
    assert [int(r[0]) for r in rows] == [g.id for g in analysis.groups]
    assert "per-op FLOPs" in out and "/conv1/Conv" in out


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_json_report(runner, model, analysis, tmp_path):
    proc = run("analyze", model, "--json", runner=runner, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["schema_version"] == 1
    assert report["total"]["flops"] == analysis.total.flops
    assert report["total"]["flops"] > 0
    assert report["flop_unit"] == "FLOPs" and report["cost"] == "flops"
    assert report["input_shapes"] == {"input": [1, 3, 16, 16]}
    assert report["model"] == str(model)
    assert len(report["groups"]) == len(analysis.groups)


def test_json_is_strict_json(model):
    proc = run("analyze", model, "--json", "--cost", "latency:T4")
    json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_macs_halves_flops(model, json_report, analysis):
    proc = run("analyze", model, "--json", "--macs")
    assert proc.returncode == 0, proc.stderr
    macs = json.loads(proc.stdout)
    assert macs["flop_unit"] == "MACs"
    assert macs["total"]["flops"] * 2 == json_report["total"]["flops"]
    assert macs["effective"]["flops"] * 2 == json_report["effective"]["flops"]
    assert macs["total"]["params"] == json_report["total"]["params"]
    text = run("analyze", model, "--macs")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^total\s+MACs ", text.stdout, re.M), text.stdout
    assert "per-op MACs" in text.stdout


def test_cost_params(model, json_report):
    proc = run("analyze", model, "--json", "--cost", "params")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cost"] == "params" and report["hardware"] is None
    assert report["total"] == json_report["total"]
    text = run("analyze", model, "--cost", "params")
    assert text.returncode == 0, text.stderr
    assert "per-op params" in text.stdout


def test_cost_latency_named_hardware(model):
    proc = run("analyze", model, "--json", "--cost", "latency:T4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cost"] == "latency"
    assert report["hardware"]["name"] == "T4"
    assert report["total"]["latency_s"] > 0
    text = run("analyze", model, "--cost", "latency:T4")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^total\s+FLOPs .*latency \S+ (us|ms)$", text.stdout, re.M), text.stdout
    assert "per-op latency on T4" in text.stdout


def test_cost_latency_custom_hardware(model):
    t4 = json.loads(run("analyze", model, "--json", "--cost", "latency:T4").stdout)  # 8100 GFLOP/s, 300 GB/s
    proc = run("analyze", model, "--json", "--cost", "latency:8000,300")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["hardware"]["peak_gflops"] == 8000
    assert report["hardware"]["bandwidth_gbs"] == 300
    # slightly slower peak, same bandwidth: never faster than the T4
    assert report["total"]["latency_s"] >= t4["total"]["latency_s"] > 0


@pytest.mark.parametrize("option", ["--gamma-threshold", "--weight-threshold"])
def test_threshold_gives_effective_cost(option, model, json_report):
    proc = run("analyze", model, "--json", option, "1.0")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["total"] == json_report["total"]
    assert report["effective"]["flops"] < report["total"]["flops"]
    text = run("analyze", model, option, "1.0")
    assert re.search(r"^effective\s+FLOPs .*threshold 1\.0\)$", text.stdout, re.M), text.stdout


def test_notes_and_input_shape_in_text_report(workdir):
    factory, shape = zoo.ZOO["ConvStack"]
    dyn = zoo.export_onnx(factory(), shape, workdir / "dyn.onnx", dynamic_batch=True)
    proc = run("analyze", dyn)
    assert proc.returncode == 0, proc.stderr
    assert "note: input 'input': dynamic batch dimension set to 1" in proc.stdout
    assert "inputs: input=[1, 3, 16, 16]" in proc.stdout
    proc = run("analyze", dyn, "--input-shape", "input=2,3,16,16")
    assert proc.returncode == 0, proc.stderr
    assert "inputs: input=[2, 3, 16, 16]" in proc.stdout and "note:" not in proc.stdout


def test_dynamic_token_axis_with_input_shape(cases):
    tokens = cases["dynamic-token-axis"].source
    proc = run("analyze", tokens, "--input-shape", "input=1,10,16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["input_shapes"] == {"input": [1, 10, 16]}


def test_external_data_model_and_files_untouched(model, workdir):
    ext = save_external(model, workdir / "ext_ok")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ext.parent.iterdir()}
    proc = run("analyze", ext, "--json", "--gamma-threshold", "0.9")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"]["flops"] == onnx_morph.analyze(ext).total.flops
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ext.parent.iterdir()} == before


# --------------------------------------------------------------------------- #
# Errors: exit 2, one line, no traceback
# --------------------------------------------------------------------------- #


BAD_COSTS = [("bogus", "'bogus'"), ("latency:NOPE", "'NOPE'")]
MORE_BAD_COSTS = ["latency:", "latency:0,300", "latency:8000", "flops:x", "latency:1,2,3"]
NON_FINITE_COSTS = ["latency:nan,300", "latency:8000,nan", "latency:inf,300"]
BAD_THRESHOLDS = ["nan", "-1", "inf"]


@pytest.fixture(scope="module")
def error_runs(cases, model):
    """Every command expected to fail, run at once (in parallel, to keep the suite fast)."""
    jobs = {("case", name): ("module", ["analyze", case.source, *shape_args(case.input_shapes)])
            for name, case in cases.items()}
    jobs.update({("spec", spec): ("module", ["analyze", model, f"--input-shape={spec}"]) for spec in BAD_SPECS})
    for runner in RUNNERS:
        jobs.update({("cost", runner, cost): (runner, ["analyze", model, "--cost", cost]) for cost, _ in BAD_COSTS})
    jobs.update({("cost", cost): ("module", ["analyze", model, "--cost", cost]) for cost in MORE_BAD_COSTS})
    jobs.update({("cost", cost): ("module", ["analyze", model, "--json", "--cost", cost]) for cost in NON_FINITE_COSTS})
    jobs.update({("gamma", v): ("module", ["analyze", model, "--gamma-threshold", v]) for v in BAD_THRESHOLDS})
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {key: pool.submit(run, *args, runner=runner) for key, (runner, args) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("cost, fragment", BAD_COSTS)
def test_bad_cost(runner, cost, fragment, error_runs):
    assert_user_error(error_runs[("cost", runner, cost)], fragment)


@pytest.mark.parametrize("cost", MORE_BAD_COSTS)
def test_more_bad_costs(cost, error_runs):
    assert_user_error(error_runs[("cost", cost)])


@pytest.mark.parametrize("cost", NON_FINITE_COSTS)
def test_non_finite_hardware_is_refused(cost, error_runs):
    assert_user_error(error_runs[("cost", cost)])


@pytest.mark.parametrize("value", BAD_THRESHOLDS)
def test_bad_threshold(value, error_runs):
    assert_user_error(error_runs[("gamma", value)], "gamma threshold")


def test_both_thresholds_is_a_usage_error(model):
    proc = run("analyze", model, "--gamma-threshold", "0.1", "--weight-threshold", "0.1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert "not allowed with" in proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input(name, cases, error_runs):
    assert_user_error(error_runs[("case", name)], *cases[name].fragments)


@pytest.mark.parametrize("name", ["missing-file", "truncated", "dynamic-token-axis"])
def test_malformed_input_console_script(name, cases):
    case = cases[name]
    assert_user_error(run("analyze", case.source, *shape_args(case.input_shapes), runner="script"), *case.fragments)


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_malformed_input_shape_spec(spec, error_runs):
    assert_user_error(error_runs[("spec", spec)], f"'{spec}'", "NAME=D0,D1")


# --------------------------------------------------------------------------- #
# Start-up stays light: no torch, no onnxruntime.training
# --------------------------------------------------------------------------- #

_PROBE = """
import json, sys
from onnx_morph.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
heavy = sorted(m for m in sys.modules
               if m == "torch" or m.startswith("torch.") or m.startswith("onnxruntime.training"))
sys.stderr.write("PROBE " + json.dumps({"codes": codes, "heavy": heavy}) + "\\n")
"""


def test_cli_does_not_import_torch_or_ort_training(model, cases):
    bad = cases["truncated"].source
    argvs = [
        ["analyze", str(model)],
        ["analyze", str(model), "--json", "--cost", "latency:T4", "--gamma-threshold", "0.5"],
        ["analyze", str(bad)],
    ]
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stderr.splitlines() if l.startswith("PROBE "))
    result = json.loads(line[len("PROBE "):])
    assert result["codes"] == [0, 0, 2]
    assert result["heavy"] == []


def test_importtime_has_no_torch_or_ort_training(model):
    proc = run("analyze", model, prefix=[sys.executable, "-X", "importtime", "-m", "onnx_morph.cli"])
    assert proc.returncode == 0, proc.stderr
    modules = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "onnx_morph.analysis" in modules  # the probe really saw the analyze imports
    heavy = [m for m in modules if m == "torch" or m.startswith("torch.") or m.startswith("onnxruntime.training")]
    assert heavy == []
