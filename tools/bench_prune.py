#!/usr/bin/env python
"""Benchmark `onnx-morph prune --ratio`: prune time, and onnxruntime latency against FLOPs kept.

Not a test: prints figures and a PASS/FAIL table of targets, always exits 0 unless the
benchmark itself cannot run.

    python -m tools.bench_prune [--workdir DIR] [--repeat N] [--runs N] [--quick] [--reuse]
                                [--models resnet50 mobilenet_v2] [--ratios 0.75 0.5 0.3]
                                [--profile] [--round-to N] [--latency]

1. Exports torchvision ResNet-50 and MobileNetV2 (random init, ``weights=None``, nothing is
   downloaded) in a child process, so torch stays out of this process: every BatchNorm gets
   uniform(0.5, 1.5) gammas (and random betas / running stats) so that the exporter does not
   merge equal initializers and the |gamma| ranking means something; export through
   ``tools/zoo.py``'s ``export_onnx(module, (1, 3, 224, 224), path, dynamic_batch=True)``
   (TorchScript exporter, BatchNorm kept).
2. For each model and ratio: times ``onnx_morph.rewrite.prune(path, Budget(ratio=R))`` in-process
   (verify on, the default, and ``verify=False``), and whole-process
   ``onnx-morph prune MODEL -o OUT --ratio R`` with and without ``--no-verify``
   (median of --repeat runs each), and saves the pruned model.
3. onnxruntime CPU latency (CPUExecutionProvider, intra_op_num_threads=2, inter_op 1,
   ORT_ENABLE_ALL graph optimizations, worker spinning off) at batch 1 and batch 32 of the original and every pruned
   model. Runs are interleaved in rounds (each round runs every session of that model once, in
   rotating order) so that load drifting over time from other processes hits every model alike;
   warm-up runs first, then the median per session.
4. Prints one table (model, ratio, FLOP ratio, param ratio, latency ratios, latency ratio / FLOP
   ratio, prune times) and the targets: latency ratio within 1.15x of the FLOP ratio at each
   batch size; in-process prune of ResNet-50 under 3 s.

--latency: also profiles each model (`onnx_morph.profile.profile`, batch 1, 2 threads, cached in
ONNX_MORPH_CACHE) and prunes it with ``prune(path, Budget(latency=R), latency_table=table)``; those
models join the interleaved timing, and a second table compares the FLOP route and the latency
route at each R: FLOPs and params kept, the table's predicted latency ratio, the measured one.
Targets: latency route measured ratio <= 1.10 R at batch 1; predictions within 10% of measurements.

--quick: ResNet-50 only, ratio 0.5, repeat 1, fewer latency runs.
--process [--baseline DIR]: only the prune time of ResNet-50 (first ratio, default 0.5), whole process
(``python -m onnx_morph.cli prune MODEL -o OUT --ratio R [--round-to N]``: start, imports, load, choose,
surgery, verify, write) and in-process (``prune_file`` in a child after a warm-up call), median of --repeat
runs (default 3) of wall and CPU (user+sys, all threads: the honest figure on a shared machine) and
minor page faults; with ``--baseline DIR`` (another checkout, e.g. ``git worktree add DIR REV``) the
same of that checkout beside it, runs interleaved. The children may write .pyc files (a warm-up run
each first), as an installed package has them.
--profile (implied when ResNet-50's in-process prune misses its target): cProfile of one
in-process prune of ResNet-50 at the first ratio, top 15 cumulative entries inside onnx_morph.
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
import statistics
import subprocess
import sys
import time

from tools.benchlib import load_average, print_targets, table, work_dir

REPO = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable
MORPH_CLI = pathlib.Path(PY).parent / "onnx-morph"

MODELS = {"resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2"}  # name -> torchvision.models attribute
RATIOS = (0.75, 0.5, 0.3)
INPUT_SHAPE = (1, 3, 224, 224)
BATCHES = (1, 32)
LATENCY_TARGET = 1.15  # latency ratio / FLOP ratio
LATENCY_ROUTE_TARGET = 1.10  # measured latency ratio / R with --target-latency R
PREDICTION_TARGET = 0.10  # |predicted / measured - 1| of the latency ratio
PRUNE_TIME_TARGET = 3.0  # seconds, in-process prune of ResNet-50
PROCESS_TIME_TARGET = 2.0  # seconds, whole-process `onnx-morph prune` of ResNet-50
THREADS = 2


# --------------------------------------------------------------------------- #
# export (child process: keeps torch and its thread pool out of this process)
# --------------------------------------------------------------------------- #


def _export_child(workdir: str, names: list[str], reuse: bool) -> int:
    import torch
    import torch.nn as nn
    from tools.zoo import export_onnx, import_torchvision

    tv = import_torchvision()
    out = {}
    for name in names:
        path = pathlib.Path(workdir) / f"{name}.onnx"
        if not (reuse and path.is_file() and path.stat().st_size > 0):
            torch.manual_seed(0)
            model = getattr(tv.models, MODELS[name])(weights=None)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.uniform_(-0.2, 0.2)
                        m.running_mean.uniform_(-0.2, 0.2)
                        m.running_var.uniform_(0.5, 1.5)
            export_onnx(model, INPUT_SHAPE, path, dynamic_batch=True)
        out[name] = str(path)
    print(json.dumps(out))
    return 0


def export(workdir: pathlib.Path, names: list[str], reuse: bool) -> dict[str, pathlib.Path]:
    cmd = [PY, "-m", "tools.bench_prune", "--_export", str(workdir)] + names + (["--reuse"] if reuse else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit("export of the torchvision models failed")
    return {k: pathlib.Path(v) for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


# --------------------------------------------------------------------------- #
# prune timing
# --------------------------------------------------------------------------- #


def time_inprocess(path: pathlib.Path, ratio: float, repeat: int, verify: bool, round_to: int = 1):
    """Median (wall s, CPU s) of prune(path, Budget(ratio=ratio)) over `repeat` runs, and the last result.

    CPU is this process's user+sys time, all threads (onnxruntime's verification runs two)."""
    from onnx_morph.rewrite import Budget, prune

    walls, cpus, result = [], [], None
    for _ in range(repeat):
        result = None
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        result = prune(str(path), Budget(ratio=ratio, round_to=round_to), verify=verify)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def cli_argv(path, out, ratio: float, verify: bool, round_to: int = 1) -> list[str]:
    head = [str(MORPH_CLI)] if MORPH_CLI.exists() else [PY, "-m", "onnx_morph.cli"]
    return (head + ["prune", str(path), "-o", str(out), "--ratio", str(ratio)] + ([] if verify else ["--no-verify"])
            + ([f"--round-to={round_to}"] if round_to != 1 else []))


def time_cli(path, out, ratio: float, repeat: int, verify: bool, round_to: int = 1) -> tuple[float, float]:
    """Median (wall s, CPU s) of whole-process `onnx-morph prune` (CPU: user+sys of the child from wait4)."""
    import resource

    walls, cpus = [], []
    argv = cli_argv(path, out, ratio, verify, round_to)
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime))
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-5:]))
    return statistics.median(walls), statistics.median(cpus)


def profile_prune(path: pathlib.Path, ratio: float, round_to: int = 1, top: int = 15) -> str:
    from onnx_morph.rewrite import Budget, prune

    prune(str(path), Budget(ratio=ratio, round_to=round_to))  # warm imports and lazily built caches out of the profile
    gc.collect()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    prune(str(path), Budget(ratio=ratio, round_to=round_to))
    prof.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    total = stats.total_tt
    stats.sort_stats("cumulative").print_stats("onnx_morph", top)
    lines = buf.getvalue().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    body = "\n".join(lines[start:]).replace(str(REPO) + os.sep, "").rstrip()
    return f"(profiled wall {wall:.3f} s, {total:.3f} s of profiled CPU; profiler overhead included)\n{body}"


def _latency_route(name: str, path: pathlib.Path, ratio: float, round_to: int, workdir: pathlib.Path,
                   pruned_paths: dict, info: dict) -> None:
    """Profile the model (cached), prune it to R of its measured latency, and the table's prediction for the
    FLOP route's model of the same R; the latency route's model joins `pruned_paths` as 'L<R>'."""
    from onnx_morph.profile import Timing, profile
    from onnx_morph.rewrite import Budget, prune, save_model

    t0 = time.perf_counter()
    latency_table = profile(path, timing=Timing(threads=THREADS, batch=1), progress=None)
    t_profile = time.perf_counter() - t0
    flop_route = prune(str(path), Budget(ratio=ratio, round_to=round_to), latency_table=latency_table, measure=False)
    info[ratio]["predicted"] = flop_route.latency.predicted_after / flop_route.latency.predicted_before
    t0 = time.perf_counter()
    result = prune(str(path), Budget(latency=ratio), latency_table=latency_table, measure=False)
    t_prune = time.perf_counter() - t0
    out = workdir / f"{name}.lat{ratio:g}.onnx"
    save_model(result.model, out, source=path)
    key = f"L{ratio:g}"
    pruned_paths[key] = out
    info[key] = dict(flops=result.after.flops / result.before.flops, params=result.after.params / result.before.params,
                     predicted=result.latency.predicted_after / result.latency.predicted_before)
    print(f"  latency route R {ratio:g}: profile {t_profile:.1f} s, prune {t_prune:.1f} s; FLOPs {info[key]['flops']:.3f}, "
          f"params {info[key]['params']:.3f}, predicted latency {info[key]['predicted']:.3f} "
          f"(FLOP route's model: predicted {info[ratio]['predicted']:.3f})", flush=True)


def _child_env(tree: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(tree)}


def _timed_child(argv: list[str], tree: pathlib.Path) -> tuple[float, float, int, str]:
    """(wall s, CPU s, minor page faults, stdout) of one child process, from wait4's rusage."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=_child_env(tree), cwd=tree, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {tree} exited {r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-5:]))
    return (wall, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), r1.ru_minflt - r0.ru_minflt, r.stdout)


def _inprocess_child(path: str, out: str, ratio: str, round_to: str) -> int:
    """Time prune_file in this process after a warm-up call (imports and caches out of the figure)."""
    from onnx_morph.rewrite import prune_file

    try:
        from onnx_morph.rewrite import Budget

        criterion, options = (Budget(ratio=float(ratio), round_to=int(round_to)),), {}
    except ImportError:  # a baseline checkout from before the criteria
        criterion, options = (), {"ratio": float(ratio), "round_to": int(round_to)}
    prune_file(path, out, *criterion, **options)
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    prune_file(path, out, *criterion, **options)
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}))
    return 0


def _process_times(args, workdir: pathlib.Path) -> int:
    """Whole-process and in-process prune of ResNet-50 by this checkout (and --baseline), interleaved."""
    path = export(workdir, ["resnet50"], args.reuse)["resnet50"]
    ratio, out = args.ratios[0], workdir / "resnet50.process.onnx"
    trees = {"this checkout": REPO}
    if args.baseline:
        trees["baseline"] = pathlib.Path(args.baseline).resolve()
    cli = [PY, "-m", "onnx_morph.cli", "prune", str(path), "-o", str(out), "--ratio", f"{ratio:g}",
           f"--round-to={args.round_to}"]
    inproc = [PY, str(pathlib.Path(__file__).resolve()), "--_inprocess", str(path), str(out), f"{ratio:g}",
              str(args.round_to)]
    print(f"load average {load_average()}; resnet50 --ratio {ratio:g} --round-to {args.round_to}; "
          f"median of {args.repeat} runs, interleaved")
    for tree in trees.values():
        _timed_child(cli, tree)  # warm-up: .pyc files, the page cache
    whole: dict[str, list] = {k: [] for k in trees}
    inside: dict[str, list] = {k: [] for k in trees}
    for _ in range(args.repeat):
        for name, tree in trees.items():
            whole[name].append(_timed_child(cli, tree)[:3])
            inside[name].append(json.loads(_timed_child(inproc, tree)[3].strip().splitlines()[-1]))
    rows = []
    for name in trees:
        wall, cpu, faults = (statistics.median(column) for column in zip(*whole[name]))
        rows.append([name, f"{wall:.2f}", f"{cpu:.2f}", f"{faults / 1e3:.0f}k",
                     f"{statistics.median(r['wall'] for r in inside[name]):.2f}",
                     f"{statistics.median(r['cpu'] for r in inside[name]):.2f}"])
    print(table(rows, ["checkout", "process wall s", "process CPU s", "page faults", "prune_file wall s",
                       "prune_file CPU s"]))
    print_targets([[f"whole-process prune of resnet50 < {PROCESS_TIME_TARGET:g} s (wall; idle machine)", rows[0][1],
                    "PASS" if float(rows[0][1]) < PROCESS_TIME_TARGET else "FAIL"]])
    return 0


# --------------------------------------------------------------------------- #
# onnxruntime latency
# --------------------------------------------------------------------------- #


def make_session(path: pathlib.Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Interleaved timing: idle workers that spin would steal the cores from the next session's run.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, pathlib.Path], batch: int, warmup: int, runs: int) -> tuple[dict, dict]:
    """(median, min) latency (s) of each model at `batch`, runs interleaved round-robin across models."""
    import numpy as np

    sessions = {k: make_session(p) for k, p in paths.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch,) + INPUT_SHAPE[1:]).astype(np.float32)
    feeds = {name: x}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for i in range(runs):
        order = keys[i % len(keys):] + keys[:i % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    del sessions
    gc.collect()
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}


# --------------------------------------------------------------------------- #
# formatting
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--_export":  # internal: the export child
        reuse = "--reuse" in argv
        rest = [a for a in argv[1:] if a != "--reuse"]
        return _export_child(rest[0], rest[1:], reuse)
    if argv and argv[0] == "--_inprocess":  # internal: in-process timing in a child of one checkout
        return _inprocess_child(*argv[1:])

    ap = argparse.ArgumentParser(description="Benchmark onnx-morph prune --ratio (see module docstring).")
    ap.add_argument("--workdir", help="where exported and pruned models go (default: a temp dir, removed after)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per prune timing, median reported (default 3; 1 with --quick)")
    ap.add_argument("--runs", type=int, default=None,
                    help="timed onnxruntime rounds at batch 1, median reported (default 30; 10 with --quick); "
                         "batch 32 runs a third as many (at least 1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed onnxruntime runs per session and batch size (default 3)")
    ap.add_argument("--quick", action="store_true", help="ResNet-50 only, ratio 0.5, repeat 1, fewer latency runs")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), help="models (default both; resnet50 with --quick)")
    ap.add_argument("--ratios", type=float, nargs="+", help="FLOP fractions to keep (default 0.75 0.5 0.3; 0.5 with --quick)")
    ap.add_argument("--reuse", action="store_true", help="reuse exported models already in --workdir")
    ap.add_argument("--profile", action="store_true", help="always cProfile the in-process prune of ResNet-50")
    ap.add_argument("--latency", action="store_true", help="add the latency route (profile, prune --target-latency R)")
    ap.add_argument("--process", action="store_true",
                    help="only the whole-process and in-process prune time of ResNet-50 (see the module docstring)")
    ap.add_argument("--baseline", metavar="DIR", help="with --process: time this other checkout beside this one")
    ap.add_argument("--round-to", type=int, default=1, metavar="N",
                    help="pass round_to=N / --round-to N to prune (default 1, the library default)")
    args = ap.parse_args(argv)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if args.process and not args.ratios:
        args.ratios = [0.5]
    args.models = args.models or (["resnet50"] if args.quick else list(MODELS))
    args.ratios = args.ratios or ([0.5] if args.quick else list(RATIOS))
    runs1 = args.runs if args.runs is not None else (10 if args.quick else 30)
    runs32 = max(1, runs1 // 3)
    args.warmup = min(args.warmup, 1) if args.quick else args.warmup
    if args.repeat < 1 or runs1 < 1:
        ap.error("--repeat and --runs must be at least 1")
    if any(not 0 < r <= 1 for r in args.ratios):
        ap.error("--ratios must be in (0, 1]")
    runs = {1: runs1, 32: runs32}

    with work_dir(args.workdir, "bench_prune_") as workdir:
        if args.process:
            return _process_times(args, workdir)
        return _run(args, workdir, runs)


def _run(args, workdir: pathlib.Path, runs: dict[int, int]) -> int:
    import platform

    import onnxruntime as ort

    print(f"python {platform.python_version()} ({PY}), onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load_average()}")
    print(f"work dir: {workdir}; prune repeat={args.repeat}; latency: {THREADS} intra-op threads, ORT_ENABLE_ALL, "
          f"{args.warmup} warm-up + median of {runs[1]} (batch 1) / {runs[32]} (batch 32) interleaved rounds")

    t0 = time.perf_counter()
    models = export(workdir, args.models, args.reuse)
    print(f"exported {', '.join(models)} in {time.perf_counter() - t0:.1f} s (BN gammas uniform 0.5..1.5, dynamic batch)")

    # one untimed prune of a small model so that lazy imports (onnxruntime, ...) are not charged to the first row
    from onnx_morph.rewrite import Budget, prune

    prune(str(models[min(models, key=lambda k: models[k].stat().st_size)]), Budget(ratio=0.9))

    rows, targets, profiles, latency_rows = [], [], [], []
    for name, path in models.items():
        print(f"\n== {name} ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)
        pruned_paths, info = {}, {}
        for ratio in args.ratios:
            out = workdir / f"{name}.r{ratio:g}.onnx"
            rt = args.round_to
            t_in, c_in, result = time_inprocess(path, ratio, args.repeat, verify=True, round_to=rt)
            t_in_nv, c_in_nv, _ = time_inprocess(path, ratio, args.repeat, verify=False, round_to=rt)
            from onnx_morph.rewrite import save_model

            save_model(result.model, out, source=path)
            cli_out = workdir / f"{name}.r{ratio:g}.cli.onnx"
            t_cli, c_cli = time_cli(path, cli_out, ratio, args.repeat, verify=True, round_to=rt)
            t_cli_nv, c_cli_nv = time_cli(path, cli_out, ratio, args.repeat, verify=False, round_to=rt)
            dev = result.masked_deviation
            info[ratio] = dict(
                flops=result.after.flops / result.before.flops,
                params=result.after.params / result.before.params,
                t_in=t_in, t_in_nv=t_in_nv, t_cli=t_cli, t_cli_nv=t_cli_nv,
                c_in=c_in, c_in_nv=c_in_nv, c_cli=c_cli, c_cli_nv=c_cli_nv,
                dev=(dev.max_rel if dev else float("nan")),
            )
            pruned_paths[ratio] = out
            if args.latency:
                _latency_route(name, path, ratio, rt, workdir, pruned_paths, info)
            print(f"  ratio {ratio:g}: FLOPs {result.after.flops / 1e9:.3f}/{result.before.flops / 1e9:.3f} G, "
                  f"params {result.after.params / 1e6:.2f}/{result.before.params / 1e6:.2f} M, "
                  f"{result.removed_channels} channel classes removed, masked deviation max_rel {info[ratio]['dev']:.2e}\n"
                  f"    prune() {t_in:.3f} s wall / {c_in:.3f} s CPU (verify=False {t_in_nv:.3f} / {c_in_nv:.3f}); "
                  f"CLI {t_cli:.3f} / {c_cli:.3f} (--no-verify {t_cli_nv:.3f} / {c_cli_nv:.3f})", flush=True)
            del result

        lat, fast = {}, {}
        for batch in BATCHES:
            t0 = time.perf_counter()
            lat[batch], fastest = latencies({"orig": path, **{r: p for r, p in pruned_paths.items()}}, batch,
                                            args.warmup, runs[batch])
            fast[batch] = fastest
            print(f"  latency batch {batch:2d} median (min): original {lat[batch]['orig'] * 1e3:.1f} "
                  f"({fastest['orig'] * 1e3:.1f}) ms; "
                  + ", ".join(f"r{r:g} {lat[batch][r] * 1e3:.1f} ({fastest[r] * 1e3:.1f}) ms" for r in args.ratios)
                  + "; ratio of mins " + ", ".join(f"r{r:g} {fastest[r] / fastest['orig']:.3f}" for r in args.ratios)
                  + f"  ({time.perf_counter() - t0:.0f} s, load {load_average()})", flush=True)

        for ratio in args.ratios if args.latency else ():
            for route, key in (("flops", ratio), ("latency", f"L{ratio:g}")):
                i = info[key]
                measured = {b: lat[b][key] / lat[b]["orig"] for b in BATCHES}
                quickest = fast[1][key] / fast[1]["orig"]
                latency_rows.append([name, f"{ratio:g}", route, f"{i['flops']:.3f}", f"{i['params']:.3f}",
                                     f"{i['predicted']:.3f}", f"{measured[1]:.3f}", f"{quickest:.3f}", f"{measured[32]:.3f}",
                                     f"{measured[1] / ratio:.2f}", f"{i['predicted'] / measured[1]:.2f}"])
                error = abs(i["predicted"] / measured[1] - 1)
                targets.append([f"{name} R{ratio:g} {route} route: prediction within {PREDICTION_TARGET:.0%} of measured",
                                f"{i['predicted']:.3f} vs {measured[1]:.3f}", "PASS" if error <= PREDICTION_TARGET else "FAIL"])
                if route == "latency":
                    q = measured[1] / ratio
                    targets.append([f"{name} --target-latency {ratio:g}: measured ratio <= {LATENCY_ROUTE_TARGET}x R",
                                    f"{measured[1]:.3f} = {q:.2f}x R", "PASS" if q <= LATENCY_ROUTE_TARGET else "FAIL"])
        for ratio in args.ratios:
            i = info[ratio]
            lr = {b: lat[b][ratio] / lat[b]["orig"] for b in BATCHES}
            rows.append([name, f"{ratio:g}", f"{i['flops']:.3f}", f"{i['params']:.3f}",
                         f"{lr[1]:.3f}", f"{lr[32]:.3f}", f"{lr[1] / i['flops']:.2f}", f"{lr[32] / i['flops']:.2f}",
                         f"{i['t_in']:.2f} ({i['c_in']:.2f})", f"{i['t_in_nv']:.2f} ({i['c_in_nv']:.2f})",
                         f"{i['t_cli']:.2f} ({i['c_cli']:.2f})", f"{i['t_cli_nv']:.2f} ({i['c_cli_nv']:.2f})",
                         f"{i['dev']:.1e}"])
            for b in BATCHES:
                q = lr[b] / i["flops"]
                targets.append([f"{name} r{ratio:g} batch {b}: latency ratio <= {LATENCY_TARGET}x FLOP ratio",
                                f"{lr[b]:.3f} / {i['flops']:.3f} = {q:.2f}x", "PASS" if q <= LATENCY_TARGET else "FAIL"])
            if name == "resnet50":
                targets.append([f"resnet50 r{ratio:g}: prune() in-process < {PRUNE_TIME_TARGET:g} s",
                                f"{i['t_in']:.3f} s", "PASS" if i["t_in"] < PRUNE_TIME_TARGET else "FAIL"])
                targets.append([f"  (info) whole-process `onnx-morph prune` < {PRUNE_TIME_TARGET:g} s",
                                f"{i['t_cli']:.3f} s", "pass" if i["t_cli"] < PRUNE_TIME_TARGET else "fail"])
        if name == "resnet50" and (args.profile or any(info[r]["t_in"] >= PRUNE_TIME_TARGET for r in args.ratios)):
            profiles.append((f"{name} ratio {args.ratios[0]:g}", profile_prune(path, args.ratios[0], args.round_to)))

    print("\nRESULTS (ratios are pruned / original; latency = median onnxruntime CPU wall time; times in s)")
    print(table(rows, ["model", "ratio", "FLOPs", "params", "lat b1", "lat b32", "lat/FLOP b1", "lat/FLOP b32",
                       "prune s (CPU)", "prune -nv", "CLI", "CLI -nv", "masked dev"]))
    print("  prune = in-process prune(path, Budget(ratio=R)) (verify on); prune -nv = verify=False;"
          " CLI = whole-process `onnx-morph prune`; -nv = --no-verify;\n"
          "  wall seconds, CPU seconds (all threads) in parentheses; masked dev = masked_deviation.max_rel"
          + (f"; round_to={args.round_to}" if args.round_to != 1 else ""))

    if latency_rows:
        print("\nFLOP route (--ratio R) against the latency route (--target-latency R), batch 1; "
              "predicted = the table's latency ratio, measured = interleaved medians")
        print(table(latency_rows, ["model", "R", "route", "FLOPs", "params", "predicted", "measured b1",
                                   "fastest runs b1", "measured b32",
                                   "measured / R", "predicted / measured"]))

    for label, text in profiles:
        print(f"\ncProfile of in-process prune, {label} (top 15 cumulative in onnx_morph):")
        print(text)

    print_targets(targets, "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
