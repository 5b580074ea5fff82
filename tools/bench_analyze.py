#!/usr/bin/env python
"""Benchmark `onnx-morph analyze` against onnx-tool's profiler and on synthetic chains.

Not a test: prints figures and a PASS/FAIL table of targets, always exits 0 unless the
benchmark itself cannot run.

    python -m tools.bench_analyze [--workdir DIR] [--repeat N] [--layers 1000 10000]
                                  [--reuse] [--profile] [--no-onnx-tool]

1. Exports torchvision ResNet-50 and DenseNet-121 (random init, 1x3x224x224, dynamo=False,
   do_constant_folding=False, default opset) via tools.export_models in its own process.
2. Times whole-process `onnx-morph analyze FILE --json > /dev/null` and onnx-tool
   (`Model(path); graph.shape_infer(); graph.profile()`), each run in a fresh child process:
   median wall time of N runs and the child's peak RSS (ru_maxrss from os.wait4 of that very
   child, spawned from a tiny trampoline process so neither this process's RSS nor another
   child's figure leaks into it). The peak RSS of a bare
   `python -c "import onnx, numpy, networkx"` is the baseline subtracted for the net figures.
3. Builds Conv(16->16, 3x3) + BatchNormalization + Relu chains (input 1x16x8x8) of the given
   layer counts with onnx.helper and times `onnx-morph analyze` on each, whole process and
   in-process `onnx_morph.analyze(path)`, and the time ratio between the largest and smallest.
4. Prints a table of targets: onnx-morph's wall time below onnx-tool's; peak RSS below 1.3x the
   model file size; 10x the layers in at most 12x the time.

--profile adds cProfile listings (top 10 cumulative entries inside onnx_morph) of the in-process
analyze of ResNet-50 and of the largest chain.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pathlib
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tools.benchlib import load_average, print_targets, table, work_dir

REPO = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = pathlib.Path(PY).parent
MORPH_CLI = BIN / "onnx-morph"

MEM_TARGET = 1.3  # peak RSS / file size
TIME_SCALE_TARGET = 12.0  # time ratio allowed for 10x layers
ONNX_TOOL_CODE = (
    "import sys, onnx_tool; m = onnx_tool.Model(sys.argv[1]); "
    "m.graph.shape_infer(); m.graph.profile()"
)
BASELINE_CODE = "import onnx, numpy, networkx"


# --------------------------------------------------------------------------- #
# child-process measurement
# --------------------------------------------------------------------------- #


class ChildFailed(RuntimeError):
    pass


# Linux carries the pre-exec RSS high-water mark of a process over its exec into ru_maxrss, and
# subprocess starts children with vfork/posix_spawn, so a child started straight from this (large)
# process would report at least this process's RSS. Children are therefore started from a tiny
# `python -I -S` trampoline (~10 MiB, below any figure measured here) that spawns the command,
# reaps it with wait4 and prints its wall time and ru_maxrss.
_TRAMPOLINE = r"""
import os, sys, time
argv = sys.argv[1:]
null = os.open(os.devnull, os.O_RDWR)
t0 = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ,
                     file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1)])
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print(os.waitstatus_to_exitcode(status), repr(wall), ru.ru_maxrss, repr(ru.ru_utime + ru.ru_stime))
"""


def run_child(argv: list[str]) -> tuple[float, int, float]:
    """Run argv (stdin and stdout /dev/null); return (wall s, peak RSS bytes, user+sys CPU s) of that child."""
    argv = [str(a) for a in argv]
    if not os.path.isabs(argv[0]):
        argv[0] = shutil.which(argv[0]) or argv[0]
    with tempfile.TemporaryFile() as err:
        r = subprocess.run([PY, "-I", "-S", "-c", _TRAMPOLINE] + argv, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=err, text=True)
        err.seek(0)
        errtext = err.read().decode(errors="replace")
    try:
        code, wall, maxrss_kib, cpu = r.stdout.split()
    except ValueError:
        raise ChildFailed(f"trampoline failed ({r.returncode}): {errtext.strip()[-500:]}") from None
    if int(code) != 0:
        tail = errtext.strip().splitlines()[-5:]
        raise ChildFailed(f"{' '.join(argv)} exited {code}: " + " | ".join(tail))
    return float(wall), int(maxrss_kib) * 1024, float(cpu)  # Linux reports ru_maxrss in KiB


def measure(argv: list[str], repeat: int) -> dict:
    walls, peaks, cpus = [], [], []
    for _ in range(repeat):
        wall, peak, cpu = run_child(argv)
        walls.append(wall)
        peaks.append(peak)
        cpus.append(cpu)
    return {"wall": statistics.median(walls), "walls": walls, "cpu": statistics.median(cpus),
            "peak": max(peaks), "peak_median": statistics.median(peaks)}


def morph_argv(path) -> list[str]:
    if MORPH_CLI.exists():
        return [str(MORPH_CLI), "analyze", str(path), "--json"]
    return [PY, "-m", "onnx_morph.cli", "analyze", str(path), "--json"]


def onnx_tool_status() -> tuple[bool, str]:
    """(usable, description) of the onnx-tool installed beside this interpreter."""
    code = (
        "import onnx, onnx_tool, importlib.metadata as md; "
        "assert hasattr(onnx_tool, 'Model'); "
        "print(md.version('onnx-tool'), onnx.__version__)"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"onnx-tool is not usable in {PY} ({last}); install with `pip install --no-deps onnx-tool tabulate`"
    tool_v, onnx_v = r.stdout.split()
    return True, f"onnx-tool {tool_v} (onnx {onnx_v})"


# --------------------------------------------------------------------------- #
# synthetic chains
# --------------------------------------------------------------------------- #


def build_chain(path: pathlib.Path, layers: int, channels: int = 16, hw: int = 8, seed: int = 0) -> pathlib.Path:
    """Conv(c->c, 3x3, pad 1, no bias) + BatchNormalization + Relu, `layers` times, opset 17."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = channels
    nodes, inits = [], []
    x = "input"
    for i in range(layers):
        w = (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"l{i}.conv.weight"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), f"l{i}.bn.weight"),
            numpy_helper.from_array(rng.uniform(-0.1, 0.1, c).astype(np.float32), f"l{i}.bn.bias"),
            numpy_helper.from_array(rng.uniform(-0.1, 0.1, c).astype(np.float32), f"l{i}.bn.running_mean"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), f"l{i}.bn.running_var"),
        ]
        y = "output" if i == layers - 1 else f"l{i}.relu"
        nodes += [
            helper.make_node("Conv", [x, f"l{i}.conv.weight"], [f"l{i}.conv"], name=f"l{i}.conv",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
            helper.make_node("BatchNormalization",
                             [f"l{i}.conv", f"l{i}.bn.weight", f"l{i}.bn.bias", f"l{i}.bn.running_mean",
                              f"l{i}.bn.running_var"], [f"l{i}.bn"], name=f"l{i}.bn", epsilon=1e-5),
            helper.make_node("Relu", [f"l{i}.bn"], [y], name=f"l{i}.relu"),
        ]
        x = y
    graph = helper.make_graph(
        nodes, f"chain{layers}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, hw, hw])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_analyze")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def inprocess_analyze(path, repeat: int) -> tuple[float, float]:
    """Median (wall s, CPU s) of onnx_morph.analyze(path) in this process (imports already warm)."""
    import onnx_morph

    walls, cpus = [], []
    for _ in range(repeat):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        result = onnx_morph.analyze(str(path))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        del result
    return statistics.median(walls), statistics.median(cpus)


def profile_analyze(path, top: int = 10) -> str:
    import onnx_morph

    onnx_morph.analyze(str(path))  # warm imports / caches out of the profile
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    onnx_morph.analyze(str(path))
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats("onnx_morph", top)
    # keep only the table (drop pstats' preamble) and shorten the repo paths
    lines = buf.getvalue().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    body = "\n".join(lines[start:]).replace(str(REPO) + os.sep, "")
    return body.rstrip()


# --------------------------------------------------------------------------- #
# formatting
# --------------------------------------------------------------------------- #


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def secs(s: float) -> str:
    return f"{s:7.3f} s"


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark onnx-morph analyze (see module docstring).")
    ap.add_argument("--workdir", help="where exported/synthetic models go (default: a temp dir, removed after)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement, median reported (default 3)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1000, 10000], help="synthetic chain lengths")
    ap.add_argument("--reuse", action="store_true", help="reuse models already in --workdir")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile in-process analyze of ResNet-50 and the largest chain (top 10 cumulative)")
    ap.add_argument("--no-onnx-tool", action="store_true", help="skip the onnx-tool comparison")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    layers = sorted(set(args.layers))

    with work_dir(args.workdir, "bench_analyze_") as workdir:
        return _run(args, workdir, layers)


def _run(args, workdir: pathlib.Path, layers: list[int]) -> int:
    import platform

    print(f"python {platform.python_version()} ({PY}), {os.cpu_count()} CPUs, repeat={args.repeat}, "
          f"load average {load_average()}")
    print(f"work dir: {workdir}")
    targets: list[list[str]] = []

    # ---- 1. export ------------------------------------------------------ #
    t0 = time.perf_counter()
    cmd = [PY, "-m", "tools.export_models", "--workdir", str(workdir)] + (["--reuse"] if args.reuse else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        print("export of the torchvision models failed", file=sys.stderr)
        return 1
    models = {k: pathlib.Path(v) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    print(f"exported {', '.join(models)} in {time.perf_counter() - t0:.1f} s")

    # ---- baseline -------------------------------------------------------- #
    base = measure([PY, "-c", BASELINE_CODE], args.repeat)
    print(f"\nbaseline `python -c \"{BASELINE_CODE}\"`: {secs(base['wall'])}, peak RSS {mib(base['peak_median'])}")
    baseline_rss = base["peak_median"]

    # ---- 2. onnx-morph vs onnx-tool -------------------------------------- #
    use_tool, tool_desc = (False, "onnx-tool comparison skipped (--no-onnx-tool)") if args.no_onnx_tool else onnx_tool_status()
    print(("comparing with " if use_tool else "NOTE: ") + tool_desc)
    rows = []
    for name, path in models.items():
        size = path.stat().st_size
        results = {}
        for tool, argv in [("onnx-morph", morph_argv(path)), ("onnx-tool", [PY, "-c", ONNX_TOOL_CODE, str(path)])]:
            if tool == "onnx-tool" and not use_tool:
                continue
            try:
                results[tool] = measure(argv, args.repeat)
            except ChildFailed as exc:
                print(f"  {tool} failed on {name}: {exc}")
                continue
            m = results[tool]
            rows.append([name, mib(size), tool, secs(m["wall"]), " ".join(f"{w:.2f}" for w in m["walls"]), secs(m["cpu"]),
                         mib(m["peak"]), f"{m['peak'] / size:5.2f}x", mib(m["peak"] - baseline_rss),
                         f"{(m['peak'] - baseline_rss) / size:5.2f}x"])
        morph, tool = results.get("onnx-morph"), results.get("onnx-tool")
        if morph and tool:
            ok = morph["wall"] < tool["wall"]
            targets.append([f"wall time {name}: onnx-morph < onnx-tool",
                            f"{morph['wall']:.3f} s vs {tool['wall']:.3f} s ({morph['wall'] / tool['wall']:.2f}x)",
                            "PASS" if ok else "FAIL"])
        elif morph:
            targets.append([f"wall time {name}: onnx-morph < onnx-tool", f"{morph['wall']:.3f} s vs n/a", "N/A"])
        else:
            targets.append([f"wall time {name}: onnx-morph < onnx-tool", "onnx-morph failed", "FAIL"])
        if morph:
            ratio, net = morph["peak"] / size, (morph["peak"] - baseline_rss) / size
            targets.append([f"peak RSS {name} < {MEM_TARGET}x file size",
                            f"{morph['peak'] / 2**20:.1f} MiB / {size / 2**20:.1f} MiB = {ratio:.2f}x",
                            "PASS" if ratio < MEM_TARGET else "FAIL"])
            targets.append(["  (info) net of baseline",
                            f"{(morph['peak'] - baseline_rss) / 2**20:.1f} MiB / {size / 2**20:.1f} MiB = {net:.2f}x",
                            "pass" if net < MEM_TARGET else "fail"])
    print()
    print(table(rows, ["model", "file size", "tool", "median wall", "runs (s)", "CPU", "peak RSS", "RSS/size",
                       "net RSS", "net/size"]))

    # ---- 3. scaling ------------------------------------------------------ #
    print("\nsynthetic chains: Conv 16->16 3x3 + BatchNormalization + Relu per layer, input 1x16x8x8")
    chains = {}
    for n in layers:
        t0 = time.perf_counter()
        chains[n] = build_chain(workdir / f"chain{n}.onnx", n) if not (
            args.reuse and (workdir / f"chain{n}.onnx").is_file()) else workdir / f"chain{n}.onnx"
        print(f"  built {n}-layer chain ({chains[n].stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    srows, scale = [], {}
    if chains:  # one untimed call so that lazy imports are not charged to the first chain
        import onnx_morph

        onnx_morph.analyze(str(chains[min(chains)]))
    for n, path in chains.items():
        size = path.stat().st_size
        try:
            proc = measure(morph_argv(path), args.repeat)
        except ChildFailed as exc:
            print(f"  onnx-morph failed on chain{n}: {exc}")
            continue
        inproc, inproc_cpu = inprocess_analyze(path, args.repeat)
        scale[n] = (proc["wall"], inproc, proc["cpu"], inproc_cpu)
        srows.append([f"{n}", f"{3 * n}", mib(size), secs(proc["wall"]), secs(proc["cpu"]), secs(inproc),
                      secs(inproc_cpu), f"{inproc / n * 1e6:8.1f} us", mib(proc["peak"]),
                      f"{proc['peak'] / size:5.2f}x"])
    print(table(srows, ["layers", "nodes", "file size", "whole process", "CPU", "in-process", "CPU",
                        "in-proc/layer", "peak RSS", "RSS/size"]))
    if len(scale) >= 2:
        lo, hi = min(scale), max(scale)
        f = hi / lo
        allowed = TIME_SCALE_TARGET * f / 10  # 12x time per 10x layers, linear in the layer factor
        for label, k in [("whole process", 0), ("in-process", 1)]:
            ratio = scale[hi][k] / scale[lo][k]
            cpu_ratio = scale[hi][k + 2] / scale[lo][k + 2]
            print(f"  {label}: {hi} vs {lo} layers ({f:g}x): wall time ratio {ratio:.2f}x, CPU time ratio {cpu_ratio:.2f}x")
            targets.append([f"scaling {label}: {f:g}x layers within {allowed:g}x time",
                            f"{scale[hi][k]:.3f} s / {scale[lo][k]:.3f} s = {ratio:.2f}x",
                            "PASS" if ratio <= allowed else "FAIL"])

    # ---- profile --------------------------------------------------------- #
    if args.profile:
        for label, path in [("ResNet-50", models.get("resnet50")), (f"{max(chains)}-layer chain", chains[max(chains)])]:
            if path is None:
                continue
            print(f"\ncProfile of in-process onnx_morph.analyze on {label} (top 10 cumulative in onnx_morph):")
            print(profile_analyze(path))

    # ---- 4. targets ------------------------------------------------------ #
    print_targets(targets, "; see CPU columns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
