#!/usr/bin/env python
"""Accuracy vs FLOPs on Fashion-MNIST: MorphNet (Gamma, and probabilistic gates) against a uniform width
multiplier and network slimming.

    python -m tools.bench_tradeoff [--out DIR] [--quick] [--seeds 3] [--budgets 0.25,0.5,0.75]
                                   [--train-subset 10000] [--shrink-epochs 3] [--finetune-epochs 1] ...

One seed network, onnx_morph.examples.small_resnet(width=16) exported with
onnx_morph.examples.export; FLOP budgets are fractions of its FLOPs (the cost model's count,
2 per multiply-accumulate). Every method gets the same total epochs,
shrink epochs + fine-tune epochs, with the same learning rates in the same two phases:

  (a) MorphNet: Gamma regularizer weighted by FLOPs (RegularizerOptions(kind="gamma",
      cost="flops")) for the shrink epochs, prune, fine-tune without the regularizer;
  (b) uniform: every layer's width scaled by one multiplier (rounded to integers, the largest
      multiplier whose FLOPs fit the budget), trained from scratch in the same two phases
      (shrink-epochs at the shrink learning rate, then fine-tune-epochs at the fine-tune one);
  (c) network slimming: plain L1 on the BatchNorm scales of produced channels
      (RegularizerOptions(kind="gamma", cost="activations"): each conv's activation cost is its
      alive output count, so its regularizer is the uniformly weighted sum of |gamma|), then the
      same pruning and fine-tuning as (a);
  (d) gates: MorphNet's LogisticSigmoid regularizer weighted by FLOPs (RegularizerOptions(kind="gates",
      cost="flops", gates_everywhere=True): the seed network has BatchNorm, so gates go on every
      group, after the BatchNorms), the trained model's closed gates folded into its weights, then
      pruned by a global threshold on gate probability and fine-tuned like (a).

(a) and (c) prune with the same rule: a global |gamma| threshold (the smallest that brings the
effective FLOPs, analyze(..., gamma_threshold=t).effective.flops, to the budget or just under it,
found by bisection over the model's |gamma| values), then onnx_morph.rewrite.surgery.prune at that
threshold. (d) bisects the same way over the gate probabilities (combined over a group's gates):
the smallest threshold whose alive channels' FLOPs meet the budget, pruned with those channel
masks. One regularized run per seed and method serves all budgets (or, with one strength per
budget, one run per budget and seed). Seed s initializes every
network with torch.manual_seed(s) ((a) and (c) start from the same weights) and shuffles the
data with s. Training runs in onnxruntime-training; test accuracy is measured in onnxruntime on
the full test set.

Two supplements follow MorphNet's paper recipe (they cost the shrink epochs on top of (b)'s, so
they are not equal-epoch methods; both need morphnet in --methods):
  morphnet-scratch: the structure MorphNet pruned to for each budget, freshly initialized
      (onnx_morph.rewrite.surgery.expand.fresh_parameters) and trained like (b);
  morphnet-expand: the structure MorphNet learned (pruned at the regularizer's own threshold,
      |gamma| <= 0.01), scaled to each budget by onnx_morph.rewrite.surgery.expand.expand (one width
      multiplier, fresh weights) and trained like (b).

Writes DIR/table.md (markdown table and settings), DIR/tradeoff.png (accuracy vs FLOPs, error
bars = standard deviation over seeds), DIR/runs.jsonl (one line per trained model; an
interrupted run resumes from it with --resume) and prints the table. --quick: a tiny subset,
one seed, one budget (50%), for CI.

--prune-after E changes the regularized methods' schedule, not the total: they are regularized for
the first E shrink epochs only, pruned, and the pruned model trains the remaining shrink epochs at
the shrink learning rate, then the fine-tune epochs, so the learning-rate schedule is uniform's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.benchlib import load_average, markdown_table, table

METHODS = ("morphnet", "gates", "uniform", "slimming", "morphnet-scratch", "morphnet-expand")
SUPPLEMENTS = ("morphnet-scratch", "morphnet-expand")
DEFAULT_METHODS = METHODS[:4]
LABELS = {"morphnet": "MorphNet (Gamma, FLOPs)", "gates": "MorphNet (LogisticSigmoid gates, FLOPs)",
          "uniform": "uniform width multiplier",
          "slimming": "network slimming (L1 on gammas)",
          "morphnet-scratch": "MorphNet's structure, retrained from scratch (+ shrink epochs)",
          "morphnet-expand": "MorphNet's structure expanded to the budget, from scratch (+ shrink epochs)"}
LEARNED_THRESHOLD = 1e-2
COSTS = {"morphnet": "flops", "slimming": "activations"}
INPUT_SHAPE = (1, 1, 28, 28)
SEED_WIDTH = 16


@dataclass
class Settings:
    seeds: list[int]
    budgets: list[float]
    train_subset: int | None
    test_subset: int | None
    shrink_epochs: int
    finetune_epochs: int
    shrink_lr: float
    finetune_lr: float
    batch_size: int
    strength_morphnet: list[float]
    strength_slimming: list[float]
    strength_gates: list[float]
    data: str
    prune_after: int | None = None  # regularized epochs before pruning (None: all shrink epochs)

    @property
    def regularized_epochs(self) -> int:
        return self.shrink_epochs if self.prune_after is None else self.prune_after

    @property
    def total_epochs(self) -> int:
        return self.shrink_epochs + self.finetune_epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-tradeoff"))
    parser.add_argument("--quick", action="store_true", help="tiny subset, 1 seed, 1 budget (CI)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", default="0.25,0.5,0.75", help="fractions of the seed network's FLOPs")
    parser.add_argument("--train-subset", type=int, default=10000, help="first N training images (0: all 60k)")
    parser.add_argument("--shrink-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--shrink-lr", type=float, default=5e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--prune-after", type=int, metavar="E",
                        help="regularize only the first E shrink epochs, prune, and train the pruned model "
                             "for the remaining shrink epochs at the shrink learning rate (default: all of them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--strength-morphnet", type=_floats, default=[32.0],
                        help="multiple of MorphNet's default strength (1 / initial regularization): one value "
                             "(one regularized run serves every budget) or one per budget, comma-separated")
    parser.add_argument("--strength-slimming", type=_floats, default=[32.0],
                        help="the same for slimming (default strength: 1 / initial sum of |gamma|)")
    parser.add_argument("--strength-gates", type=_floats, default=[32.0],
                        help="the same for gates (default strength: 1 / initial FLOP-weighted gate probabilities)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}; {' and '.join(SUPPLEMENTS)} (not "
                             "defaults: they cost the shrink epochs on top) train MorphNet's structures from a fresh "
                             "initialization for the same epochs as uniform")
    parser.add_argument("--work", type=Path, help="keep models and logs here (default: a temporary folder)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs in OUT/runs.jsonl")
    args = parser.parse_args(argv)

    from onnx_morph.data import fashion_mnist_available, load_dataset

    if fashion_mnist_available():
        data = load_dataset("fashion-mnist")
    else:
        print("Fashion-MNIST is not installed; using scikit-learn's digits resized to 28x28", file=sys.stderr)
        data = load_dataset("digits").resized(28, 28)
    budgets = _floats(args.budgets)
    if args.prune_after is not None and not 1 <= args.prune_after <= args.shrink_epochs:
        parser.error(f"--prune-after takes 1 to --shrink-epochs ({args.shrink_epochs}) epochs")
    for option in ("strength_morphnet", "strength_slimming", "strength_gates"):
        if len(getattr(args, option)) not in (1, len(budgets)):
            parser.error(f"--{option.replace('_', '-')} takes one value or one per budget ({len(budgets)})")
    if args.quick:
        # The quick run's one budget, 50%, uses the strength given for it (or the only one).
        def pick(values: list[float]) -> list[float]:
            return [dict(zip(budgets, values)).get(0.5, values[0])] if len(values) > 1 else values

        # With --prune-after, 2 shrink epochs: 1 regularized, 1 after pruning.
        settings = Settings(seeds=[0], budgets=[0.5], train_subset=1024, test_subset=1000,
                            shrink_epochs=1 if args.prune_after is None else 2,
                            finetune_epochs=1, shrink_lr=args.shrink_lr, finetune_lr=args.finetune_lr,
                            batch_size=args.batch_size, strength_morphnet=pick(args.strength_morphnet),
                            strength_slimming=pick(args.strength_slimming), strength_gates=pick(args.strength_gates),
                            data=data.name, prune_after=None if args.prune_after is None else 1)
    else:
        settings = Settings(seeds=list(range(args.seeds)), budgets=budgets,
                            train_subset=args.train_subset or None, test_subset=None,
                            shrink_epochs=args.shrink_epochs, finetune_epochs=args.finetune_epochs,
                            shrink_lr=args.shrink_lr, finetune_lr=args.finetune_lr, batch_size=args.batch_size,
                            strength_morphnet=args.strength_morphnet, strength_slimming=args.strength_slimming,
                            strength_gates=args.strength_gates,
                            data=data.name, prune_after=args.prune_after)
    data = data.subset(train=settings.train_subset, test=settings.test_subset)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: use {', '.join(METHODS)}")
    if set(SUPPLEMENTS) & set(methods) and "morphnet" not in methods:
        parser.error(f"{', '.join(SUPPLEMENTS)} retrain MorphNet's structures: add morphnet to --methods")
    methods.sort(key=METHODS.index)

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    records = _load(log) if args.resume else []
    if not args.resume and log.exists():
        log.unlink()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tradeoff-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(settings, data, work, log, records)
        for seed in settings.seeds:
            for method in methods:
                if method == "uniform":
                    for budget in settings.budgets:
                        bench.uniform(seed, budget)
                elif method in SUPPLEMENTS:
                    for budget in settings.budgets:
                        bench.scratch(method, seed, budget)
                else:
                    bench.regularized(method, seed)
        seed_flops = bench.seed_flops
    wall = time.perf_counter() - started
    records = [r for r in bench.records if r["method"] in methods and r["seed"] in settings.seeds
               and r["budget"] in settings.budgets]
    report = render(records, settings, seed_flops, wall, quick=args.quick)
    (args.out / "table.md").write_text(report)
    png = plot(records, seed_flops, args.out / "tradeoff.png")
    print(console_table(records, seed_flops))
    print(f"\nwall time {wall / 60:.1f} min; load average at the end: {load_average()}")
    print(f"table: {args.out / 'table.md'}; plot: {png}; runs: {log}")
    return 0


class Bench:
    def __init__(self, settings: Settings, data, work: Path, log: Path, records: list[dict]):
        self.settings, self.data, self.work, self.log, self.records = settings, data, work, log, records
        self.train_data = (data.x_train, data.y_train)
        self.test_data = (data.x_test, data.y_test)
        self._seed_flops: float | None = None
        self.pruned: dict[tuple[str, int, float], Path] = {}
        self.learned: dict[int, Path] = {}

    @property
    def seed_flops(self) -> float:
        if self._seed_flops is None:
            from onnx_morph.analysis import analyze

            self._seed_flops = analyze(self.network(0, None, self.work / "flops-probe.onnx")).total.flops
        return self._seed_flops

    def done(self, method: str, seed: int, budget: float) -> bool:
        return any(r["method"] == method and r["seed"] == seed and r["budget"] == budget for r in self.records)

    def record(self, record: dict) -> None:
        record["seed_flops"] = self.seed_flops
        self.records.append(record)
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {record['method']:8s} seed {record['seed']} budget "
              f"{record['budget']:.2f}: FLOPs {record['flops'] / self.seed_flops:.3f} of the seed, "
              f"test accuracy {record['accuracy']:.4f} ({record['seconds']:.0f} s)", file=sys.stderr, flush=True)

    def network(self, seed: int, widths: tuple[int, int, int] | None, path: Path) -> Path:
        import torch

        from onnx_morph.examples import export, small_resnet

        torch.manual_seed(seed)
        return export(small_resnet(width=SEED_WIDTH, widths=widths), INPUT_SHAPE, path)

    def regularized(self, method: str, seed: int) -> None:
        """(a) or (c): a regularized run per distinct strength, then prune to its budgets and fine-tune each."""
        s = self.settings
        multiples = {"morphnet": s.strength_morphnet, "slimming": s.strength_slimming, "gates": s.strength_gates}[method]
        per_budget = dict(zip(s.budgets, multiples if len(multiples) > 1 else multiples * len(s.budgets)))
        for multiple in dict.fromkeys(per_budget.values()):
            budgets = [b for b, m in per_budget.items() if m == multiple and not self.done(method, seed, b)]
            if budgets:
                self._shrink_prune_finetune(method, seed, multiple, budgets)

    def _shrink_prune_finetune(self, method: str, seed: int, multiple: float, budgets: list[float]) -> None:
        from onnx_morph.analysis import analyze
        from onnx_morph.rewrite.training.artifacts import make_training_artifacts
        from onnx_morph.rewrite.training.regularizer import RegularizerOptions
        from onnx_morph.rewrite import Threshold, prune
        from onnx_morph.rewrite.surgery.save import save_model
        from onnx_morph.train import CALIBRATION_BATCHES, accuracy, train

        s = self.settings
        started = time.perf_counter()
        folder = self.work / f"{method}-seed{seed}-x{multiple:g}"
        folder.mkdir(parents=True, exist_ok=True)
        seed_path = self.network(seed, None, folder / "seed.onnx")
        options = (RegularizerOptions(kind="gates", cost="flops", gates_everywhere=True) if method == "gates"
                   else RegularizerOptions(kind="gamma", cost=COSTS[method]))
        artifacts = make_training_artifacts(seed_path, folder / "shrink", regularizer=options,
                                            batch_size=s.batch_size, overwrite=True)
        strength = multiple * artifacts.strength
        shrunk = train(artifacts, self.train_data, epochs=s.regularized_epochs, learning_rate=s.shrink_lr,
                       strength=strength, structure_every=0, export=folder / "shrunk.onnx",
                       test_data=self.test_data, seed=seed, progress=None)
        shrink_seconds = time.perf_counter() - started
        if method == "gates":
            at_default = shrunk.effective_cost  # alive: gate probability >= 0.1
        else:
            at_default = analyze(shrunk.model_path, gamma_threshold=LEARNED_THRESHOLD).effective.flops
        if method == "morphnet":
            learned = prune(shrunk.model_path, Threshold(gamma=LEARNED_THRESHOLD), verify=False)
            self.learned.setdefault(seed, save_model(learned.model, folder / "learned.onnx"))  # the strongest shrink
        calibration = self.data.calibration_batches(CALIBRATION_BATCHES * s.batch_size, s.batch_size)
        for budget in budgets:
            tic = time.perf_counter()
            if method == "gates":
                threshold, pruned = prune_gates_to_budget(artifacts, shrunk, budget * self.seed_flops, calibration)
            else:
                threshold, pruned = prune_to_budget(shrunk.model_path, budget * self.seed_flops, calibration)
            pruned_path = save_model(pruned.model, folder / f"pruned-{budget:.2f}.onnx")
            self.pruned[(method, seed, budget)] = pruned_path
            pruned_accuracy = accuracy(pruned.model, self.test_data)
            tuned = self._train_phases(pruned_path, folder / f"finetune-{budget:.2f}", seed,
                                       s.shrink_epochs - s.regularized_epochs)
            report = analyze(tuned.model_path)
            self.record(dict(
                method=method, seed=seed, budget=budget, accuracy=tuned.test_accuracy, flops=report.total.flops,
                params=report.total.params, widths=[[w.node, w.before, w.after] for w in pruned.widths],
                threshold=threshold, pruned_accuracy=pruned_accuracy, shrunk_accuracy=shrunk.test_accuracy,
                strength=strength, strength_multiple=multiple, default_strength=artifacts.strength,
                regularized_epochs=s.regularized_epochs,
                shrunk_flops_at_0_01=at_default / self.seed_flops,
                seconds=shrink_seconds / len(budgets) + time.perf_counter() - tic))

    def uniform(self, seed: int, budget: float) -> None:
        """(b): the largest uniform multiplier within the budget, trained from scratch in the same two phases."""
        from onnx_morph.analysis import analyze

        if self.done("uniform", seed, budget):
            return
        started = time.perf_counter()
        folder = self.work / f"uniform-seed{seed}-{budget:.2f}"
        folder.mkdir(parents=True, exist_ok=True)
        multiplier, widths = uniform_widths(budget * self.seed_flops, self._uniform_flops)
        tuned = self._train_phases(self.network(seed, widths, folder / "scratch.onnx"), folder, seed)
        report = analyze(tuned.model_path)
        self.record(dict(method="uniform", seed=seed, budget=budget, accuracy=tuned.test_accuracy,
                         flops=report.total.flops, params=report.total.params, multiplier=multiplier,
                         widths=list(widths), seconds=time.perf_counter() - started))

    def scratch(self, method: str, seed: int, budget: float) -> None:
        """A MorphNet structure with fresh weights, trained like uniform: the one pruned to this budget
        (morphnet-scratch), or the learned one expanded to it (morphnet-expand)."""
        import onnx

        from onnx_morph.analysis import analyze
        from onnx_morph.rewrite.surgery.expand import expand, fresh_parameters
        from onnx_morph.rewrite.surgery.save import save_model

        if self.done(method, seed, budget):
            return
        structure = self.learned.get(seed) if method == "morphnet-expand" else self.pruned.get(("morphnet", seed, budget))
        if structure is None:
            raise SystemExit(f"{method}: no MorphNet structure for seed {seed}, budget {budget} in this "
                             "run (it does not resume from runs.jsonl); rerun without --resume")
        started = time.perf_counter()
        folder = self.work / f"{method}-seed{seed}-{budget:.2f}"
        folder.mkdir(parents=True, exist_ok=True)
        extra = {}
        if method == "morphnet-expand":
            expanded = expand(structure, target_flops=budget * self.seed_flops, seed=seed)
            fresh, extra = expanded.model, {"multiplier": expanded.multiplier,
                                            "widths": [[w.node, w.before, w.after] for w in expanded.widths]}
        else:
            fresh = fresh_parameters(onnx.load(str(structure)), seed)
        tuned = self._train_phases(save_model(fresh, folder / "scratch.onnx"), folder, seed)
        report = analyze(tuned.model_path)
        self.record(dict(method=method, seed=seed, budget=budget, accuracy=tuned.test_accuracy,
                         flops=report.total.flops, params=report.total.params,
                         seconds=time.perf_counter() - started, **extra))

    def _train_phases(self, path: Path, folder: Path, seed: int, first_epochs: int | None = None):
        """The two phases every method trains in, without a regularizer here: `first_epochs` (default:
        all shrink epochs) at the shrink learning rate, then fine-tune epochs at the fine-tune one,
        each with fresh AdamW state."""
        from onnx_morph.rewrite.training.artifacts import make_training_artifacts
        from onnx_morph.train import train

        s = self.settings
        first_epochs = s.shrink_epochs if first_epochs is None else first_epochs
        folder.mkdir(parents=True, exist_ok=True)
        if first_epochs:
            first = make_training_artifacts(path, folder / "phase1", regularizer=None, batch_size=s.batch_size,
                                            overwrite=True)
            path = train(first, self.train_data, epochs=first_epochs, learning_rate=s.shrink_lr,
                         export=folder / "phase1.onnx", seed=seed, progress=None).model_path
        second = make_training_artifacts(path, folder / "phase2", regularizer=None,
                                         batch_size=s.batch_size, overwrite=True)
        return train(second, self.train_data, epochs=s.finetune_epochs, learning_rate=s.finetune_lr,
                     export=folder / "trained.onnx", test_data=self.test_data, seed=seed, progress=None)

    def _uniform_flops(self, widths: tuple[int, int, int]) -> float:
        from onnx_morph.analysis import analyze

        return analyze(self.network(0, widths, self.work / "flops-probe.onnx")).total.flops


def uniform_widths(budget: float, flops_of) -> tuple[float, tuple[int, int, int]]:
    """The largest multiplier m whose widths round(m * (16, 32, 64)) (at least 1) fit `budget` FLOPs.

    The widths are step functions of m, so the search runs over the multipliers where one of them
    changes; FLOPs grow with m, so bisection finds the largest that fits."""
    base = (SEED_WIDTH, 2 * SEED_WIDTH, 4 * SEED_WIDTH)

    def widths(m: float) -> tuple[int, int, int]:
        return tuple(max(1, int(np.floor(m * b + 0.5))) for b in base)

    # Each width w = floor(m*b + 0.5) steps up at m = (k - 0.5) / b.
    steps = sorted({(k - 0.5) / b for b in base for k in range(1, b + 1)} | {1.0})
    candidates = [m for m in steps if m <= 1.0]
    cache: dict = {}

    def fits(m: float) -> bool:
        w = widths(m)
        if w not in cache:
            cache[w] = flops_of(w)
        return cache[w] <= budget

    if not fits(candidates[0]):
        raise SystemExit(f"no uniform width fits {budget:.0f} FLOPs")
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid - 1
    return candidates[lo], widths(candidates[lo])


def prune_to_budget(path: Path, budget: float, calibration: list[np.ndarray] | None = None):
    """The smallest global |gamma| threshold whose effective FLOPs are at or under `budget`, and the
    model pruned at it (stepping to the next threshold if pruning keeps a channel analyze counts as dead),
    its BatchNorm statistics measured on `calibration`."""
    from onnx_morph.analysis import analyze
    from onnx_morph.graph import source_strength
    from onnx_morph.rewrite import Threshold, prune

    # Per channel, the largest |gamma| of the BatchNorms on it (the value analyze compares with the threshold).
    gammas = source_strength(analyze(path).graph, "gamma")
    return _smallest_fitting_threshold(
        np.unique(np.concatenate([[0.0], gammas[np.isfinite(gammas)]])), budget, f"{path}: |gamma|",
        flops_at=lambda t: analyze(path, gamma_threshold=t).effective.flops,
        prune_at=lambda t: prune(path, Threshold(gamma=t), calibration=calibration))


def prune_gates_to_budget(artifacts, shrunk, budget: float, calibration: list[np.ndarray] | None = None):
    """The smallest global gate-probability threshold t whose alive channels (probability > t and open
    in the eval graph, every group keeping its most probable channel) fit `budget` FLOPs, and the
    trained model pruned to them (stepping to the next threshold if the pruned model's FLOPs exceed
    the budget). A run that closed more than the budget asks for ends under it."""
    from onnx_morph.costs import total_cost
    from onnx_morph.graph import build_channel_graph, load_model
    from onnx_morph.rewrite import Mask, prune
    from onnx_morph.rewrite.surgery.select import mask_document

    graph = build_channel_graph(load_model(artifacts.base_model))
    regularizer = artifacts.regularizer.build(graph)
    fixed = regularizer.fixed[:-1]
    probability = shrunk.vector
    open_ = regularizer.kept({g.param: shrunk.gate_logits[g.param] / g.logit_scale for g in regularizer.gates})[:-1]

    def alive(t: float) -> np.ndarray:
        kept = ((probability > t) & open_) | fixed
        for group in graph.groups:
            if not kept[group.classes].any():
                kept[group.classes[np.argmax(probability[group.classes])]] = True
        return kept

    return _smallest_fitting_threshold(
        np.unique(np.concatenate([[0.0], probability[~fixed]])), budget, f"{shrunk.model_path}: gate",
        flops_at=lambda t: total_cost(graph, alive(t), "flops"),
        prune_at=lambda t: prune(shrunk.model_path, Mask(mask_document(graph, alive(t))), calibration=calibration))


def _smallest_fitting_threshold(candidates: np.ndarray, budget: float, label: str, flops_at, prune_at):
    """Bisection over sorted thresholds for the smallest whose FLOPs meet the budget (FLOPs fall as the
    threshold rises), then the first from there whose pruned model does: (threshold, PruneResult)."""
    lo, hi = 0, len(candidates) - 1
    if flops_at(float(candidates[hi])) > budget:
        raise SystemExit(f"{label}: even the largest threshold leaves more than {budget:.0f} FLOPs")
    while lo < hi:
        mid = (lo + hi) // 2
        if flops_at(float(candidates[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    for threshold in map(float, candidates[lo:]):
        pruned = prune_at(threshold)
        if pruned.after.flops <= budget:
            return threshold, pruned
    raise SystemExit(f"{label}: no threshold prunes to {budget:.0f} FLOPs")


def summary(records: list[dict]) -> dict:
    """{(budget, method): (mean accuracy, std, min, max, mean FLOPs, mean params, n)}."""
    out = {}
    for key in sorted({(r["budget"], r["method"]) for r in records}, key=lambda k: (k[0], METHODS.index(k[1]))):
        runs = [r for r in records if (r["budget"], r["method"]) == key]
        acc = [r["accuracy"] for r in runs]
        out[key] = dict(mean=statistics.mean(acc), std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                        min=min(acc), max=max(acc), flops=statistics.mean(r["flops"] for r in runs),
                        params=statistics.mean(r["params"] for r in runs), n=len(acc),
                        pruned=[r["pruned_accuracy"] for r in runs if "pruned_accuracy" in r])
    return out


def _rows(records: list[dict], seed_flops: float) -> list[list[str]]:
    rows = []
    stats = summary(records)
    for (budget, method), v in stats.items():
        rivals = [w["mean"] for (b, m), w in stats.items() if b == budget and m != method]
        pruned = f"{100 * statistics.mean(v['pruned']):.1f}%" if v["pruned"] else "-"
        mark = " (best)" if rivals and v["mean"] >= max(rivals) else ""
        rows.append([f"{100 * budget:.0f}%", LABELS[method], f"{v['flops'] / 1e6:.2f}",
                     f"{v['flops'] / seed_flops:.3f}", f"{v['params'] / 1e3:.1f}k",
                     f"{100 * v['mean']:.2f}% ± {100 * v['std']:.2f}{mark}",
                     f"{100 * v['min']:.2f}-{100 * v['max']:.2f}%", pruned, str(v["n"])])
    return rows


HEADER = ["budget", "method", "MFLOPs", "FLOPs / seed", "params", "test accuracy (mean ± std)", "min-max",
          "after pruning (BatchNorm re-measured)", "seeds"]


def console_table(records: list[dict], seed_flops: float) -> str:
    return table(_rows(records, seed_flops), HEADER)


def render(records: list[dict], s: Settings, seed_flops: float, wall: float, quick: bool) -> str:
    subset = f"the first {s.train_subset} training images" if s.train_subset else "all training images"
    test = f"the first {s.test_subset} test images" if s.test_subset else "the full test set"
    lines = [
        markdown_table(_rows(records, seed_flops), HEADER),
        "",
        f"Seed network: small_resnet(width={SEED_WIDTH}), {seed_flops / 1e6:.2f} MFLOPs (2 per multiply-accumulate). "
        f"Data: {s.data}, {subset}, accuracy on {test}. Seeds {s.seeds}; budgets {s.budgets}.",
        f"Every method: {s.total_epochs} epochs in total at batch {s.batch_size}, AdamW, {s.shrink_epochs} at "
        f"learning rate {s.shrink_lr:g} (for MorphNet, gates and slimming: {_regularized(s)}), then "
        f"{s.finetune_epochs} at {s.finetune_lr:g} without a regularizer.",
        f"Strengths (multiples of the default, 1 / initial regularization value"
        f"{', per budget' if max(map(len, (s.strength_morphnet, s.strength_slimming, s.strength_gates))) > 1 else ''}): "
        f"MorphNet {_multiples(s.strength_morphnet)}, gates {_multiples(s.strength_gates)}, "
        f"slimming {_multiples(s.strength_slimming)}.",
        f"Wall time {wall / 60:.1f} min{' (--quick)' if quick else ''}.",
    ]
    return "\n".join(lines) + "\n"


def _regularized(s: Settings) -> str:
    if s.regularized_epochs == s.shrink_epochs:
        return "regularized, then pruned"
    return (f"the first {s.regularized_epochs} regularized, then pruned, the other "
            f"{s.shrink_epochs - s.regularized_epochs} plain")


def _multiples(values: list[float]) -> str:
    return ", ".join(f"{v:g}x" for v in values)


def plot(records: list[dict], seed_flops: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary(records)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for offset, method in zip((-0.008, -0.004, 0.0, 0.004, 0.008), METHODS):
        points = sorted((b, v) for (b, m), v in stats.items() if m == method)
        if not points:
            continue
        x = [v["flops"] / seed_flops + offset for _, v in points]
        axes.errorbar(x, [100 * v["mean"] for _, v in points], yerr=[100 * v["std"] for _, v in points],
                      marker="o", capsize=4, label=LABELS[method])
    axes.set_xlabel("FLOPs / seed network's FLOPs")
    axes.set_ylabel("test accuracy (%)")
    n = max((v["n"] for v in stats.values()), default=0)
    axes.set_title(f"accuracy vs FLOPs, mean and std over {n} seed{'s' if n != 1 else ''}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
