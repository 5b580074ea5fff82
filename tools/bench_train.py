#!/usr/bin/env python
"""Benchmark the cost of MorphNet's regularizer in an onnxruntime-training step.

Not a test: prints figures and a PASS/FAIL target table, exits 0 unless the benchmark cannot run.

    python -m tools.bench_train [--width 40] [--batch 64] [--steps 30] [--rounds 5] [--cost flops]

One ResNet-style CNN (onnx_morph.examples.small_resnet, about 1M parameters at width 40) on
28x28 inputs, batch 64, timed three ways in one process, interleaved in rounds so that load
from other processes hits all three alike:
  - ORT: onnxruntime-training artifacts without the regularizer (plain fine-tuning artifacts);
  - ORT + MorphNet: the same with the Gamma regularizer (--cost) and its strength input;
  - torch eager: the same module, AdamW, BatchNorm in training mode.
Each round runs --steps optimizer steps per variant after warm-up; the table gives the median
step time. Target: the regularizer adds at most 5% to the ORT step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.benchlib import print_targets, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cost", default="flops")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from onnx_morph.examples import export, small_resnet
    from onnx_morph.rewrite.training.artifacts import make_training_artifacts
    from onnx_morph.rewrite.training.regularizer import RegularizerOptions
    from onnx_morph.rewrite.surgery.verify import onnxruntime

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = small_resnet(width=args.width)
    params = sum(p.numel() for p in module.parameters())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int64)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        path = export(module, (1, 1, 28, 28), work / "cnn.onnx")
        onnxruntime()
        from onnxruntime.training import api

        steppers = {}
        for label, options in (("ORT", None), ("ORT + MorphNet", RegularizerOptions(cost=args.cost))):
            artifacts = make_training_artifacts(path, work / label.replace(" ", ""), regularizer=options,
                                                batch_size=args.batch)
            steppers[label] = _ort_stepper(api, artifacts, x, y, args.threads)
        steppers["torch eager"] = _torch_stepper(torch, module, x, y)

        times = {label: [] for label in steppers}
        for step in steppers.values():
            step(3)
        for round_index in range(args.rounds):
            order = list(steppers)
            order = order[round_index % len(order):] + order[:round_index % len(order)]
            for label in order:
                started = time.perf_counter()
                steppers[label](args.steps)
                times[label].append((time.perf_counter() - started) / args.steps)

    median = {label: statistics.median(t) for label, t in times.items()}
    base = median["ORT"]
    rows = [[label, f"{1000 * m:.1f} ms", f"{1000 * min(times[label]):.1f} ms", f"{m / base:.3f}x"]
            for label, m in median.items()]
    print(f"small_resnet(width={args.width}): {params / 1e6:.2f}M parameters, batch {args.batch}, 28x28, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps")
    print(table(rows, ["variant", "median step", "best step", "vs ORT"]))
    overhead = median["ORT + MorphNet"] / base - 1
    print_targets([["regularizer overhead on the ORT step <= 5%", f"{100 * overhead:+.1f}%",
                    "PASS" if overhead <= 0.05 else "FAIL"]])


def _ort_stepper(api, artifacts, x, y, threads):
    from onnx_morph.rewrite.training.artifacts import STRENGTH, native_stderr_silenced

    from onnx_morph.rewrite.surgery.verify import onnxruntime

    options = onnxruntime().SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    with native_stderr_silenced():
        state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
        module = api.Module(str(artifacts.training_model), state, str(artifacts.eval_model), session_options=options)
        optimizer = api.Optimizer(str(artifacts.optimizer_model), module)
    feeds = {artifacts.inputs[0]: x, artifacts.labels: y, STRENGTH: np.array(artifacts.strength, np.float32)}
    inputs = [feeds[n] for n in module.input_names()]
    module.train()

    def step(n: int) -> None:
        for _ in range(n):
            module(*inputs)
            optimizer.step()
            module.lazy_reset_grad()

    return step


def _torch_stepper(torch, module, x, y):
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(module(inputs), labels).backward()
            optimizer.step()

    return step


if __name__ == "__main__":
    main()
