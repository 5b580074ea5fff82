#!/usr/bin/env python
"""MorphNet in a plain PyTorch training loop on Fashion-MNIST, in one process or with DDP.

    python -m tools.train_fashion_mnist_torch [--ddp] [--epochs 3] [--train-limit 12000] [--width 8]
                                              [--strength S] [--threshold 0.01] [--cost flops]
                                              [--out DIR]

The CNN is onnx-morph's demo ResNet (onnx_morph.examples.small_resnet, 28x28 input). Each step
adds `strength * regularizer().regularization` to the cross-entropy; the regularizer is built once
(`MorphNetRegularizer(model, example)`) and reads the model's BatchNorm scales directly. After
training: the learned structure (`export_structure`) and the pruned ONNX model (`prune_module`),
checked in onnxruntime on the test set. The strength defaults to 1 / (the initial regularization),
so the term starts at 2 next to a cross-entropy of about 2.3 (MorphNet: search on a log scale
around the inverse of the initial cost). The defaults (width 8, 12000 images, 3 epochs) take a few
minutes on 2 CPUs and remove about a third of the FLOPs; train longer for a better network.

--ddp: the same with DistributedDataParallel on 2 CPU processes (gloo backend, one thread each).
Every global batch is split between the ranks; each rank evaluates the regularizer on its own
copy of the parameters, which DDP keeps identical, and the script checks after every epoch that
both ranks see the same alive counts and effective cost.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist,
IDX gz files), or the folder in ONNX_MORPH_FASHION_MNIST; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from onnx_morph.data import fashion_mnist
from onnx_morph.errors import OptionError
from onnx_morph.examples import small_resnet
from onnx_morph.torch import MorphNetRegularizer, export_structure, prune_module
from tools.benchlib import table

EXPORT = {"input_names": ["input"], "output_names": ["logits"],
          "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddp", action="store_true", help="DistributedDataParallel on 2 CPU processes (gloo)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (split between ranks with --ddp)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD (momentum 0.9) learning rate, cosine-decayed")
    parser.add_argument("--train-limit", type=int, default=12000, help="use the first N training images (0: all 60000)")
    parser.add_argument("--strength", type=float, default=None, help="default: 2 / initial regularization")
    parser.add_argument("--threshold", type=float, default=1e-2, help="|gamma| at or below which a channel is dead")
    parser.add_argument("--cost", default="flops", help="flops, params, activations or latency:HW")
    parser.add_argument("--width", type=int, default=8, help="channels of the first stage (the demo uses 16)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("fashion_mnist_morphnet"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(rank: int, world: int, args: argparse.Namespace, rendezvous: str | None) -> None:
    """One process of the run (rank 0 of 1 without --ddp)."""
    distributed = world > 1
    if distributed:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    say = print if rank == 0 else (lambda *a, **k: None)
    data = fashion_mnist().subset(train=args.train_limit or None)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = small_resnet(args.width, data.num_classes)
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    started = time.perf_counter()
    regularizer = MorphNetRegularizer(net, x_train[:1], cost=args.cost, threshold=args.threshold,
                                      export_options=EXPORT)
    setup = time.perf_counter() - started
    initial = regularizer()
    strength = args.strength or 2.0 / float(initial.regularization.detach())
    say(f"{data.name}: {len(x_train)} training / {len(x_test)} test images; "
        f"{'DDP, %d gloo processes' % world if distributed else 'one process'}, {torch.get_num_threads()} thread(s) each")
    say(f"regularizer: {regularizer.kind} x {args.cost}, {len(regularizer.bindings)} BatchNorm scales, "
        f"{regularizer.graph.num_classes} channel classes, built in {setup:.2f} s; total cost {regularizer.total_cost:.4g}, "
        f"initial regularization {float(initial.regularization.detach()):.4g}, strength {strength:.3g}")

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    per_rank = args.batch_size // world
    steps = len(x_train) // args.batch_size
    # SGD rather than Adam: Adam moves every scale by about the learning rate per step whatever its
    # gradient, so the L1 pull takes ~1/lr steps to bring a scale from 1 to 0 and then keeps it
    # oscillating about 0 with that amplitude. The cosine decay lets dead scales settle below the threshold.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps)
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)  # the same on every rank
        totals = {"loss": 0.0, "reg": 0.0, "correct": 0, "seen": 0, "reg_time": 0.0}
        epoch_start = time.perf_counter()
        for step in range(steps):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size][rank * per_rank:(rank + 1) * per_rank]
            x, y = x_train[batch], y_train[batch]
            optimizer.zero_grad(set_to_none=True)
            logits = net(x)
            t = time.perf_counter()
            out = regularizer()
            totals["reg_time"] += time.perf_counter() - t
            loss = F.cross_entropy(logits, y) + strength * out.regularization
            loss.backward()
            optimizer.step()
            schedule.step()
            totals["loss"] += float(loss.detach())
            totals["reg"] += float(out.regularization.detach())
            totals["correct"] += int((logits.argmax(1) == y).sum())
            totals["seen"] += len(y)
        out = regularizer()
        structure = regularizer.alive_counts(out.alive)
        if distributed:
            _check_ranks_agree(structure, float(out.cost), world)
        accuracy = evaluate(model, x_test, y_test) if rank == 0 else float("nan")
        say(f"epoch {epoch + 1}: loss {totals['loss'] / steps:.3f}, regularization {totals['reg'] / steps:.4g}, "
            f"train acc {totals['correct'] / max(totals['seen'], 1):.3f}, test acc {accuracy:.3f}; effective cost "
            f"{float(out.cost):.4g} ({float(out.cost) / regularizer.total_cost:.1%}), {out.alive_channels}/"
            f"{regularizer.graph.num_classes} channel classes alive; {time.perf_counter() - epoch_start:.1f} s "
            f"({totals['reg_time'] / steps * 1e3:.2f} ms/step in the regularizer)"
            + ("; ranks agree" if distributed else ""))

    if rank == 0:
        finish(model, regularizer, args, x_train, x_test, y_test)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _check_ranks_agree(structure: dict[str, int], cost: float, world: int) -> None:
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, (structure, cost))
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(f"ranks disagree on the learned structure: {gathered}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return correct / len(x)


def finish(model, regularizer: MorphNetRegularizer, args: argparse.Namespace, x_train, x_test, y_test) -> None:
    """The two calls after training: the structure, and the pruned ONNX model, checked on the test set."""
    from onnx_morph.rewrite.surgery.verify import onnxruntime

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "trained.pt")
    structure = export_structure(regularizer, args.out / "structure.json")
    calibration = [x_train[i:i + args.batch_size] for i in range(0, 20 * args.batch_size, args.batch_size)]
    result = prune_module(regularizer, args.out / "pruned.onnx", calibration=calibration)
    zeroed_accuracy = evaluate(regularizer.zeroed_copy(), x_test, y_test)
    print(f"\nstructure ({args.out / 'structure.json'}): " + ", ".join(f"{k} {v}" for k, v in structure.items()))
    session = onnxruntime().InferenceSession(str(args.out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"input": x_test[i:i + 1000].numpy()})[0]
                             for i in range(0, len(x_test), 1000)])
    pruned_accuracy = float((logits.argmax(1) == y_test.numpy()).mean())
    torch_accuracy = evaluate(model, x_test, y_test)
    rows = [["FLOPs", f"{result.before.flops:.4g}", f"{result.after.flops:.4g}", f"{result.after.flops / result.before.flops:.3f}"],
            ["parameters", f"{result.before.params:.0f}", f"{result.after.params:.0f}", f"{result.after.params / result.before.params:.3f}"],
            ["test accuracy", f"{torch_accuracy:.4f}", f"{pruned_accuracy:.4f}", f"{pruned_accuracy - torch_accuracy:+.4f}"]]
    print(f"pruned model: {args.out / 'pruned.onnx'}, {result.removed_channels} "
          f"channel classes removed; before calibration, largest output deviation (relative, random inputs) from "
          f"the trained model {result.original_deviation.max_rel:.1e}, from it with dropped constants masked "
          f"{result.masked_deviation.max_rel:.1e}")
    print(table(rows, ["", "trained (torch)", "pruned (onnxruntime)", "ratio / change"]))
    print(f"  in torch, the trained model with its dead scales at 0: test accuracy {zeroed_accuracy:.4f}; "
          f"the pruned model's {'; '.join(result.notes)}")
    (args.out / "summary.json").write_text(json.dumps({
        "flops": [result.before.flops, result.after.flops], "params": [result.before.params, result.after.params],
        "accuracy": {"trained": torch_accuracy, "dead_scales_zeroed": zeroed_accuracy, "pruned": pruned_accuracy},
        "structure": structure}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        fashion_mnist()  # installed, cached, or downloaded now, before any worker starts
    except OptionError as exc:
        print(f"train_fashion_mnist_torch: {exc}", file=sys.stderr)
        return 2
    if not args.ddp:
        train(0, 1, args, None)
        return 0
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as rendezvous:
        mp.spawn(train, args=(2, args, os.path.join(rendezvous, "store")), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
