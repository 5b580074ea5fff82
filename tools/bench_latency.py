#!/usr/bin/env python
"""Benchmark `onnx-morph profile`: cold (empty cache) and warm whole-process times, and the table's
prediction of the whole model against its measurement.

Not a test: prints figures and a PASS/FAIL table of targets, always exits 0 unless the
benchmark itself cannot run.

    python -m tools.bench_latency [--workdir DIR] [--models resnet50 mobilenet_v2] [--threads 2]
                                  [--batch 1] [--max-points 10] [--reuse]

Exports the torchvision models as tools.bench_prune does (random init, BatchNorm kept), then
runs `onnx-morph profile MODEL -o TABLE` twice in a fresh process with ONNX_MORPH_CACHE pointing at
a new folder: the first run measures every op (cold), the second reads the cache (warm).
Targets: ResNet-50 cold under 3 minutes on 2 cores, warm under 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from tools.bench_prune import MORPH_CLI, PY, export
from tools.benchlib import load_average, print_targets, table, work_dir

COLD_TARGET = 180.0
WARM_TARGET = 2.0


def profile_once(model: pathlib.Path, out: pathlib.Path, cache: str, args) -> float:
    head = [str(MORPH_CLI)] if MORPH_CLI.exists() else [PY, "-m", "onnx_morph.cli"]
    argv = head + ["profile", str(model), "-o", str(out), "--threads", str(args.threads), "--batch", str(args.batch),
                   "--max-points", str(args.max_points)]
    start = time.perf_counter()
    r = subprocess.run(argv, env={**os.environ, "ONNX_MORPH_CACHE": cache}, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    print(r.stderr.strip().splitlines()[-1])
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-points", type=int, default=10)
    parser.add_argument("--reuse", action="store_true", help="reuse exported models in --workdir")
    args = parser.parse_args()
    print(f"load average at the start: {load_average()}")
    rows, targets = [], []
    with work_dir(args.workdir, "bench_latency_") as workdir:
        paths = export(pathlib.Path(workdir), args.models, args.reuse)
        for name, path in paths.items():
            cache = tempfile.mkdtemp(prefix="latency_cache_", dir=workdir)
            out = pathlib.Path(workdir) / f"{name}.latency.json"
            cold = profile_once(path, out, cache, args)
            warm = profile_once(path, out, cache, args)
            doc = json.loads(out.read_text())
            points = sum(len(op["in"]) * len(op["out"]) if not op["tied"] else len(op["out"]) for op in doc["ops"].values())
            rows.append([name, str(len(doc["ops"])), str(points), f"{cold:.1f}", f"{warm:.2f}",
                         f"{doc['model_ms']:.2f}", f"{doc['ops_ms']:.2f}", f"{doc['overhead_ms']:.2f}"])
            if name == "resnet50":
                targets.append(["ResNet-50 profile, cold cache", f"{cold:.1f} s < {COLD_TARGET:.0f} s",
                                "PASS" if cold < COLD_TARGET else "FAIL"])
                targets.append(["ResNet-50 profile, warm cache", f"{warm:.2f} s < {WARM_TARGET:.0f} s",
                                "PASS" if warm < WARM_TARGET else "FAIL"])
    print()
    print(table(rows, ["model", "ops", "grid points (all ops)", "cold s", "warm s", "model ms", "ops ms", "overhead ms"]))
    print_targets(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
