#!/usr/bin/env python
"""Benchmark the overhead of onnx_morph.torch.MorphNetRegularizer per torch training step.

Not a test: prints figures and a PASS/FAIL table of targets, always exits 0 unless the
benchmark itself cannot run.

    python tools/bench_torch_regularizer.py [--steps N] [--warmup N] [--quick]

For each case (model, input, batch, regularizer, cost) the same model trains with SGD on random
data in two ways, alternated step by step so that load from other processes hits both alike:
a plain step (forward, cross-entropy, backward, optimizer step) and a step that also evaluates
the regularizer and adds `strength * regularization` to the loss. Reported: median step times,
their ratio minus one (the overhead; target at most 5%), the regularizer alone (evaluation plus
its backward, timed in isolation) as a share of the plain step, and the one-time construction
(export, channel graph, regularizer).

Cases: the Fashion-MNIST example CNN (onnx_morph.examples.small_resnet, 28x28) at batch 128 and
32, with gamma x FLOPs and group-lasso x FLOPs; torchvision ResNet-18 (gamma x latency:T4) and
MobileNetV2 (gamma x FLOPs, 52 BatchNorms, depthwise convs) at 64x64, batch 16, random init
(nothing is downloaded).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "tests")]

from benchlib import load_average, print_targets, table  # noqa: E402

from onnx_morph.examples import small_resnet  # noqa: E402
from onnx_morph.torch import MorphNetRegularizer  # noqa: E402

OVERHEAD_TARGET = 0.05


def torchvision_model(name: str) -> torch.nn.Module:
    from zoo import import_torchvision  # the workaround for torchvision's CPU-incompatible ops

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

    times: dict[str, list[float]] = {"plain": [], "regularized": [], "alone": []}
    for i in range(warmup + steps):
        order = (("plain", plain), ("regularized", regularized)) if i % 2 else (("regularized", regularized), ("plain", plain))
        for name, step in order:
            t = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    optimizer.zero_grad(set_to_none=True)
    for i in range(warmup + 5 * steps):
        t = time.perf_counter()
        alone()
        if i >= warmup:
            times["alone"].append(time.perf_counter() - t)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"build": build, "sources": len(reg.bindings), "classes": reg.graph.num_classes, **medians}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the example CNN cases only, 10 steps")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.quick or c[0].startswith("example")]
    steps = 10 if args.quick else args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {steps} steps of each kind per case, "
          f"alternated; load average {load_average()}", flush=True)
    rows, targets = [], []
    for label, factory, shape, batch, kind, cost in cases:
        r = bench_case(factory, shape, batch, kind, cost, steps, args.warmup)
        overhead = r["regularized"] / r["plain"] - 1
        share = r["alone"] / r["plain"]
        name = f"{label} b{batch} {kind} x {cost}"
        print(f"  {name}: plain {r['plain'] * 1e3:.1f} ms, regularized {r['regularized'] * 1e3:.1f} ms "
              f"({overhead:+.1%}), regularizer alone {r['alone'] * 1e3:.2f} ms ({share:.1%}); "
              f"built in {r['build']:.2f} s (load {load_average()})", flush=True)
        rows.append([label, str(batch), kind, cost, str(r["sources"]), str(r["classes"]), f"{r['build']:.2f}",
                     f"{r['plain'] * 1e3:.1f}", f"{r['regularized'] * 1e3:.1f}", f"{overhead:+.1%}",
                     f"{r['alone'] * 1e3:.2f}", f"{share:.1%}"])
        targets.append([f"{name}: overhead per step <= {OVERHEAD_TARGET:.0%}",
                        f"{overhead:+.1%} ({r['regularized'] * 1e3:.1f} vs {r['plain'] * 1e3:.1f} ms; alone {share:.1%})",
                        "PASS" if overhead <= OVERHEAD_TARGET else "FAIL"])
    print("\nRESULTS (median wall times per training step; overhead = regularized / plain - 1)")
    print(table(rows, ["model", "batch", "regularizer", "cost", "sources", "classes", "build s", "plain ms",
                       "regularized ms", "overhead", "reg alone ms", "alone / plain"]))
    print("  reg alone = the regularizer's evaluation and its backward timed by themselves (the overhead's"
          " noise-free part); build = export + channel graph + regularizer, once")
    print_targets(targets, "; the 'alone' share is the load-independent figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
