#!/usr/bin/env python
"""Benchmark the overhead of onnx_morph.torch.MorphNetRegularizer per torch training step.

Not a test: prints figures and a PASS/FAIL table of targets, always exits 0 unless the
benchmark itself cannot run.

    python -m tools.bench_torch_regularizer [--steps N] [--warmup N] [--threads N] [--default-malloc] [--quick]

For each case (model, input, batch, regularizer, cost) the same model trains with SGD on random
data in two ways, alternated step by step so that load from other processes hits both alike:
a plain step (forward, cross-entropy, backward, optimizer step) and a step that also evaluates
the regularizer and adds `strength * regularization` to the loss. Reported: median step times in
CPU time of this process (wall time next to it), the overhead (median over adjacent pairs of the
regularized minus the plain step, over the median plain step; target at most 5%), the regularizer alone (evaluation plus its backward, timed in isolation) as a share of
the plain step, and the one-time construction (export, channel graph, regularizer).

glibc's malloc is told not to return memory to the system (MALLOC_TRIM_THRESHOLD_,
MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_; the script re-executes itself with them; --default-malloc
keeps glibc's defaults): by default it unmaps and re-faults the multi-megabyte activation buffers
of every step, which costs the plain step about a quarter of its time here, and any extra
allocation (the regularizer's few kilobytes) shifts that pattern by several percent either way.
PyTorch's CPU performance guidance (jemalloc or tcmalloc) avoids the same churn.

CPU time and one torch thread by default (--threads): on a shared machine whose load exceeds its
cores, wall times of a multi-threaded step swing by tens of percent from run to run, and an op
split across threads stalls until the other thread is scheduled, which hits the regularizer's
small tensors hardest; CPU time of one thread is what the step costs.

Cases: the Fashion-MNIST example CNN (onnx_morph.examples.small_resnet, 28x28) at batch 128 and
32, with gamma x FLOPs and group-lasso x FLOPs; torchvision ResNet-18 (gamma x latency:T4) and
MobileNetV2 (gamma x FLOPs, 52 BatchNorms, depthwise convs) at 64x64, batch 16, random init
(nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from onnx_morph.examples import small_resnet
from onnx_morph.torch import MorphNetRegularizer
from tools.benchlib import load_average, print_targets, table

OVERHEAD_TARGET = 0.05
KEEP_MEMORY = {"MALLOC_TRIM_THRESHOLD_": "4000000000", "MALLOC_MMAP_THRESHOLD_": "4000000000",
               "MALLOC_TOP_PAD_": "1000000000"}


def torchvision_model(name: str) -> torch.nn.Module:
    from tools.zoo import import_torchvision  # the workaround for torchvision's CPU-incompatible ops

    return getattr(import_torchvision().models, name)(weights=None, num_classes=10)


CASES = [
    # label, factory, input shape (without batch), batch, regularizer, cost
    ("example CNN w16", lambda: small_resnet(16, 10), (1, 28, 28), 128, "gamma", "flops"),
    ("example CNN w16", lambda: small_resnet(16, 10), (1, 28, 28), 32, "gamma", "flops"),
    ("example CNN w16", lambda: small_resnet(16, 10), (1, 28, 28), 128, "group-lasso", "flops"),
    ("ResNet-18 64px", lambda: torchvision_model("resnet18"), (3, 64, 64), 16, "gamma", "latency:T4"),
    ("MobileNetV2 64px", lambda: torchvision_model("mobilenet_v2"), (3, 64, 64), 16, "gamma", "flops"),
]


def bench_case(factory, shape, batch: int, kind: str, cost: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = factory().train()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    started = time.perf_counter()
    reg = MorphNetRegularizer(model, x[:1], regularizer=kind, cost=cost)
    build = time.perf_counter() - started
    model.train()
    strength = 1.0 / float(reg().regularization.detach())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def regularized() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = reg()
        (F.cross_entropy(model(x), y) + strength * out.regularization).backward()
        optimizer.step()

    def alone() -> None:
        (strength * reg().regularization).backward()

    times: dict[str, list[tuple[float, float]]] = {"plain": [], "regularized": [], "alone": []}

    def timed(name: str, step) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        step()
        times[name].append((time.process_time() - cpu, time.perf_counter() - wall))

    for i in range(warmup + steps):
        order = (("plain", plain), ("regularized", regularized)) if i % 2 else (("regularized", regularized), ("plain", plain))
        for name, step in order:
            timed(name, step)
    optimizer.zero_grad(set_to_none=True)
    for i in range(warmup + 5 * steps):
        timed("alone", alone)
    result = {"build": build, "sources": len(reg.bindings), "classes": reg.graph.num_classes}
    for name, values in times.items():
        kept = values[warmup:]
        result[name] = statistics.median(v[0] for v in kept)
        result[name + "_wall"] = statistics.median(v[1] for v in kept)
    # Each regularized step against the plain step next to it: drifting load cancels out.
    for unit, index in (("", 0), ("_wall", 1)):
        pairs = zip(times["regularized"][warmup:], times["plain"][warmup:])
        result["paired" + unit] = statistics.median(r[index] - p[index] for r, p in pairs) / result["plain" + unit]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="the example CNN cases only, 10 steps")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc trimming (see above)")
    args = parser.parse_args(argv)
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in KEEP_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, "-m", "tools.bench_torch_regularizer", *sys.argv[1:]],
                  {**os.environ, **KEEP_MEMORY})
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not args.quick or c[0].startswith("example")]
    steps = 10 if args.quick else args.steps
    malloc = "glibc malloc defaults" if args.default_malloc else "malloc keeps freed memory"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {malloc}; {steps} steps of each kind per case, "
          f"alternated; times are CPU time of this process (wall in parentheses); load average {load_average()}",
          flush=True)
    rows, targets = [], []
    for label, factory, shape, batch, kind, cost in cases:
        r = bench_case(factory, shape, batch, kind, cost, steps, args.warmup)
        overhead, wall_overhead = r["paired"], r["paired_wall"]
        share = r["alone"] / r["plain"]
        name = f"{label} b{batch} {kind} x {cost}"
        print(f"  {name}: plain {r['plain'] * 1e3:.1f} ms ({r['plain_wall'] * 1e3:.1f}), regularized "
              f"{r['regularized'] * 1e3:.1f} ms ({r['regularized_wall'] * 1e3:.1f}): {overhead:+.1%} ({wall_overhead:+.1%}); "
              f"regularizer alone {r['alone'] * 1e3:.2f} ms ({r['alone_wall'] * 1e3:.2f}), {share:.1%} of a step; "
              f"built in {r['build']:.2f} s (load {load_average()})", flush=True)
        rows.append([label, str(batch), kind, cost, str(r["sources"]), str(r["classes"]), f"{r['build']:.2f}",
                     f"{r['plain'] * 1e3:.1f}", f"{r['regularized'] * 1e3:.1f}", f"{overhead:+.1%}",
                     f"{wall_overhead:+.1%}", f"{r['alone'] * 1e3:.2f}", f"{share:.1%}"])
        targets.append([f"{name}: overhead per step <= {OVERHEAD_TARGET:.0%}",
                        f"{overhead:+.1%} ({r['regularized'] * 1e3:.1f} vs {r['plain'] * 1e3:.1f} ms; alone {share:.1%})",
                        "PASS" if overhead <= OVERHEAD_TARGET else "FAIL"])
    print("\nRESULTS (median CPU time per training step; overhead = median over adjacent pairs of (regularized - plain),\n"
          "over the median plain step)")
    print(table(rows, ["model", "batch", "regularizer", "cost", "sources", "classes", "build s", "plain ms",
                       "regularized ms", "overhead", "wall overhead", "reg alone ms", "alone / plain"]))
    print("  reg alone = the regularizer's evaluation and its backward timed by themselves (the overhead's"
          " noise-free part); build = export + channel graph + regularizer, once")
    print_targets(targets, "; the targets use CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
