"""Nothing is ever lost or half-written: the real CLI in a subprocess, with the faults injected by the
kernel rather than by patching onnx-morph.

- Every analyze and prune invocation leaves its input files byte-for-byte unchanged (sha256), for an
  inline model and one with external data.
- A full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG) gives exit code 2 and a one-line
  `cannot write` error, and leaves no output and no temporary file; an older file at the output path
  keeps its content.
- A process killed in the middle of writing (the same limit with SIGXFSZ at its default action: the
  kernel kills the process at the write that crosses it), or by SIGKILL at any moment, leaves no
  temporary file and either no output or the whole output, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from tools import zoo

try:
    from test_load_errors import save_external
except ImportError:  # tests/ turned into a package
    from tests.test_load_errors import save_external

from cli_checks import assert_user_error

_FAULTY_CLI = (
    "import resource, runpy, signal, sys\n"
    "limit, action = int(sys.argv[1]), sys.argv[2]\n"
    "if limit >= 0:\n"
    "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "if action == 'die':\n"
    "    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default\n"
    "sys.argv = ['onnx-morph', *sys.argv[3:]]\n"
    "runpy.run_module('onnx_morph.cli', run_name='__main__', alter_sys=True)\n"
)


def cli(*args, file_limit: int = -1, on_limit: str = "fail", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI with at most `file_limit` bytes per written file; past it, a write fails ("fail") or
    the process is killed by SIGXFSZ ("die")."""
    return subprocess.run([sys.executable, "-c", _FAULTY_CLI, str(file_limit), on_limit, *map(str, args)],
                          capture_output=True, text=True, timeout=180, cwd=cwd, check=False)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """BasicBlock inline, and the same with its weights in weights.bin, each alone in a folder."""
    root = tmp_path_factory.mktemp("fault")
    factory, shape = zoo.ZOO["BasicBlock"]
    inline = zoo.export_onnx(factory(), shape, root / "inline" / "model.onnx")
    return {"inline": inline, "external": save_external(inline, root / "external")}


def _leftovers(folder: Path, expected: set[str]) -> list[str]:
    return sorted(set(os.listdir(folder)) - expected)


# --------------------------------------------------------------------------- #
# Inputs are never modified
# --------------------------------------------------------------------------- #

COMMANDS = {
    "analyze": ["analyze", "{model}"],
    "analyze-json-latency": ["analyze", "{model}", "--json", "--cost", "latency:T4", "--all-ops"],
    "analyze-gamma": ["analyze", "{model}", "--gamma-threshold", "0.9", "--macs"],
    "analyze-weight": ["analyze", "{model}", "--weight-threshold", "0.05"],
    "analyze-structure": ["analyze", "{model}", "--gamma-threshold", "0.9", "--structure", "{out}/masks.json"],
    "prune-ratio": ["prune", "{model}", "-o", "{out}/p.onnx", "--ratio", "0.5"],
    "prune-gamma": ["prune", "{model}", "-o", "{out}/p.onnx", "--gamma-threshold", "0.9"],
    "prune-weight": ["prune", "{model}", "-o", "{out}/p.onnx", "--weight-threshold", "0.05", "--no-verify"],
    "prune-params": ["prune", "{model}", "-o", "{out}/p.onnx", "--target-params", "3000", "--round-to", "2"],
    "prune-error": ["prune", "{model}", "-o", "{out}/p.onnx", "--ratio", "0.0001"],
}


@pytest.mark.parametrize("kind", ["inline", "external"])
def test_no_command_modifies_its_input(kind, models, tmp_path):
    model = models[kind]
    before = digest(model.parent)
    codes = {}
    for name, template in COMMANDS.items():
        out = tmp_path / name
        out.mkdir()
        proc = cli(*[a.format(model=model, out=out) for a in template])
        codes[name] = proc.returncode
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        assert digest(model.parent) == before, f"{name} changed the input files"
        written = sorted(os.listdir(out))
        assert written == ([] if proc.returncode else [p for p in ("masks.json", "p.onnx") if (out / p).exists()]), (name, written)
    assert codes == {**{name: 0 for name in COMMANDS}, "prune-error": 2}
    # and --mask reads its file without touching it either
    masks = tmp_path / "analyze-structure" / "masks.json"
    mask_bytes = masks.read_bytes()
    assert cli("prune", model, "-o", tmp_path / "from_mask.onnx", "--mask", masks).returncode == 0
    assert masks.read_bytes() == mask_bytes and digest(model.parent) == before


# --------------------------------------------------------------------------- #
# Full disk, and death in the middle of a write
# --------------------------------------------------------------------------- #


def _writes(model: Path, out: Path) -> dict[str, tuple[list[str], str]]:
    """The commands that write a file, with the file they write."""
    return {
        "prune": (["prune", str(model), "-o", str(out / "p.onnx"), "--ratio", "0.5"], "p.onnx"),
        "structure": (["analyze", str(model), "--gamma-threshold", "0.9", "--structure", str(out / "masks.json")], "masks.json"),
    }


@pytest.mark.parametrize("command", ["prune", "structure"])
def test_full_disk_leaves_nothing(command, models, tmp_path):
    model = models["inline"]
    before = digest(model.parent)
    args, name = _writes(model, tmp_path)[command]
    proc = cli(*args, file_limit=300)
    assert_user_error(proc, name, "cannot write", "File too large")
    assert os.listdir(tmp_path) == []
    assert digest(model.parent) == before


@pytest.mark.parametrize("command", ["prune", "structure"])
def test_full_disk_keeps_an_older_output_whole(command, models, tmp_path):
    args, name = _writes(models["inline"], tmp_path)[command]
    (tmp_path / name).write_bytes(b"the previous result")
    assert_user_error(cli(*args, file_limit=300), "cannot write")
    assert os.listdir(tmp_path) == [name]
    assert (tmp_path / name).read_bytes() == b"the previous result"


@pytest.mark.parametrize("command", ["prune", "structure"])
def test_killed_mid_write_leaves_nothing(command, models, tmp_path):
    model = models["external"]
    before = digest(model.parent)
    args, name = _writes(model, tmp_path)[command]
    proc = cli(*args, file_limit=300, on_limit="die")
    assert proc.returncode == -signal.SIGXFSZ, (proc.returncode, proc.stderr)
    assert os.listdir(tmp_path) == [], "a temporary or partial file survived the kill"
    assert digest(model.parent) == before
    # the same command, undisturbed, writes its file whole
    assert cli(*args).returncode == 0
    assert os.listdir(tmp_path) == [name]


def test_sigkill_at_any_moment(models, tmp_path):
    """SIGKILL at several moments of a prune: never a temporary file, never a partial output."""
    model = models["inline"]
    reference = tmp_path / "reference"
    reference.mkdir()
    start = time.perf_counter()
    assert cli("prune", model, "-o", reference / "p.onnx", "--ratio", "0.5").returncode == 0
    duration = time.perf_counter() - start
    expected = onnx.load(str(reference / "p.onnx")).SerializeToString()
    for fraction in (0.3, 0.6, 0.8, 0.9, 0.95, 1.0):
        out = tmp_path / f"kill_{fraction}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _FAULTY_CLI, "-1", "fail", "prune", str(model),
                                 "-o", str(out / "p.onnx"), "--ratio", "0.5"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        listing = os.listdir(out)
        assert listing in ([], ["p.onnx"]), (fraction, listing)
        if listing:
            assert (out / "p.onnx").read_bytes() == expected, f"partial output after a kill at {fraction}"


def test_structure_file_is_whole_json(models, tmp_path):
    """The mask file written by an undisturbed run parses (the atomic writer's text path)."""
    args, name = _writes(models["inline"], tmp_path)["structure"]
    assert cli(*args).returncode == 0
    assert json.loads((tmp_path / name).read_text())["format"] == "onnx-morph-masks"
