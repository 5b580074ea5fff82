"""Run MorphNet training artifacts in onnxruntime-training and export the trained inference model.

Every step logs the task loss, the regularization value and the effective cost (outputs of the
training graph) to a CSV and TensorBoard; every `structure_every` steps the alive channels per
group are computed from the current parameters and MorphNet's `{node: alive}` structure is
written to learned_structure/alive_STEP.json. The exported model is the base model with the
trained weights and BatchNorm running statistics measured on training batches (the training
graph normalizes with batch statistics and leaves the running ones untouched).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.errors import OptionError
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.rewrite.artifacts import STRENGTH, TrainingArtifacts, load_artifacts, native_stderr_silenced
from onnx_morph.rewrite.calibrate import recalibrated_batchnorm
from onnx_morph.rewrite.gates import fold_gates
from onnx_morph.rewrite.save import save_model
from onnx_morph.rewrite.select import mask_document
from onnx_morph.rewrite.verify import onnxruntime

Batch = tuple[np.ndarray, np.ndarray]
CALIBRATION_BATCHES = 20


@dataclass
class TrainResult:
    steps: int
    task_loss: float
    regularization: float | None
    effective_cost: float | None
    structure: dict[str, int]
    alive_per_group: dict[int, int]
    model_path: Path | None = None
    vector: np.ndarray | None = field(default=None, repr=False)  # per class: the final regularization values
    gate_logits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # logits, not stored parameters
    test_accuracy: float | None = None
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list, repr=False)


def train(
    artifacts: str | os.PathLike | TrainingArtifacts,
    data: Batch | Iterable[Batch],
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    strength: float | Callable[[int], float] | None = None,
    log_dir: str | os.PathLike | None = None,
    structure_every: int = 100,
    export: str | os.PathLike | None = None,
    test_data: Batch | None = None,
    seed: int = 0,
    progress: TextIO | None = sys.stderr,
) -> TrainResult:
    """Train for `epochs` over `data`: (x, y) arrays (shuffled, cut into batches of the artifacts'
    batch size; the last partial batch is dropped) or an iterable of (x, y) batches of that size.

    `strength` overrides the artifacts' strength; a callable gets the step number (a schedule).
    `log_dir` (default: the artifacts folder) receives train_log.csv, TensorBoard events and
    learned_structure/. With `export`, the trained inference model is written there, and with
    `test_data` its accuracy is measured in onnxruntime.
    """
    if not isinstance(artifacts, TrainingArtifacts):
        artifacts = load_artifacts(artifacts)
    if epochs < 1:
        raise OptionError(f"epochs must be at least 1, not {epochs}")
    if batch_size is not None and batch_size != artifacts.batch_size:
        raise OptionError(f"the artifacts in {artifacts.directory} train with batches of {artifacts.batch_size}, "
                          f"not {batch_size}; regenerate them with --batch-size {batch_size}")
    batch_size = artifacts.batch_size
    log_dir = Path(log_dir) if log_dir is not None else artifacts.directory
    log_dir.mkdir(parents=True, exist_ok=True)
    schedule = _schedule(strength if strength is not None else artifacts.strength)
    tracker = _StructureTracker(artifacts)

    ort = onnxruntime()
    ort.set_default_logger_severity(3)
    from onnxruntime.training import api

    with native_stderr_silenced():
        state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
        module = api.Module(str(artifacts.training_model), state, str(artifacts.eval_model))
        optimizer = api.Optimizer(str(artifacts.optimizer_model), module)
    if learning_rate is not None:
        optimizer.set_learning_rate(learning_rate)
    names = module.input_names()
    regularized = STRENGTH in names
    label_type = np.int64 if artifacts.loss == "cross-entropy" else np.float32
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    history: list[dict] = []
    step = 0
    with _Logs(log_dir) as logs:
        module.train()
        for epoch in range(epochs):
            batches = list(_batches(data, batch_size, rng))
            bar = _Progress(progress, f"epoch {epoch + 1}/{epochs}", len(batches))
            for x, y in batches:
                feeds = {artifacts.inputs[0]: x.astype(np.float32), artifacts.labels: y.astype(label_type)}
                if regularized:
                    feeds[STRENGTH] = np.array(schedule(step), dtype=np.float32)
                outputs = module(*[feeds[n] for n in names])
                optimizer.step()
                module.lazy_reset_grad()
                outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
                loss = float(outputs[0])
                record = {"step": step, "epoch": epoch, "loss": loss, "task_loss": loss}
                if regularized:
                    cost, reg = float(outputs[1]), float(outputs[2])
                    record.update(task_loss=loss - schedule(step) * reg, regularization=reg,
                                  effective_cost=cost, strength=schedule(step))
                if not math.isfinite(loss):
                    raise OptionError(f"training diverged at step {step} (loss {loss}); lower the learning rate "
                                      "or the strength")
                if tracker.enabled and structure_every and step % structure_every == 0:
                    record.update(tracker.record(state, log_dir, step))
                logs.write(record)
                history.append(record)
                bar.update(record)
                step += 1
            bar.close()
        final = tracker.record(state, log_dir, step, final=True) if tracker.enabled else {}
        if final:
            logs.write({"step": step, "epoch": epochs, **final})
    last = history[-1]
    result = TrainResult(
        steps=step, task_loss=last["task_loss"], regularization=last.get("regularization"),
        effective_cost=final.get("effective_cost_after") if final else None,
        structure=tracker.structure, alive_per_group=tracker.alive_per_group, vector=tracker.vector,
        gate_logits={g.param: g.logits(state.parameters[g.param].data) for g in tracker.gates},
        seconds=time.perf_counter() - started, history=history)
    if export is not None:
        trained = trained_model(artifacts, state, data, batch_size, tracker.gates)
        result.model_path = save_model(trained, export, source=artifacts.base_model)
        if test_data is not None:
            result.test_accuracy = accuracy(trained, test_data)
    return result


def trained_model(artifacts: TrainingArtifacts, state, data, batch_size: int = 64, gates=None) -> onnx.ModelProto:
    """The base model with the checkpoint's parameters and BatchNorm statistics measured on `data`;
    probabilistic gates (`gates`: the regularizer's, rebuilt when None) are folded into their producers."""
    model = onnx.load(str(artifacts.base_model))
    if gates is None:
        gates = _StructureTracker(artifacts).gates
    gate_params = {g.param: np.asarray(state.parameters[g.param].data) for g in gates}
    by_name = {t.name: t for t in model.graph.initializer}
    for name in artifacts.trainable:
        if name not in gate_params:
            by_name[name].CopyFrom(numpy_helper.from_array(np.asarray(state.parameters[name].data, dtype=np.float32),
                                                           name))
    fold_gates(model, gates, gate_params)
    batches = list(_batches(data, batch_size, np.random.default_rng(1)))[:CALIBRATION_BATCHES]
    return recalibrated_batchnorm(model, [x for x, _ in batches], artifacts.inputs[0])


def accuracy(model: onnx.ModelProto, data: Batch, batch_size: int = 256) -> float:
    """Top-1 accuracy of the model's first output in onnxruntime."""
    session = onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x, y = data
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = session.run(None, {name: x[start:start + batch_size].astype(np.float32)})[0]
        correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    return correct / len(y)


class _StructureTracker:
    """Alive channels per group and MorphNet's structure, computed from the current parameters."""

    def __init__(self, artifacts: TrainingArtifacts):
        self.enabled = artifacts.regularizer is not None
        self.structure: dict[str, int] = {}
        self.alive_per_group: dict[int, int] = {}
        self.vector: np.ndarray | None = None
        self.gates = ()
        if self.enabled:
            self.graph = build_channel_graph(load_model(artifacts.base_model, {
                k: tuple(v) for k, v in artifacts.input_shapes.items()}))
            self.regularizer = artifacts.regularizer.build(self.graph)
            self.gates = self.regularizer.gates

    def record(self, state, log_dir: Path, step: int, final: bool = False) -> dict:
        params = {s.param: np.asarray(state.parameters[s.param].data) for s in self.regularizer.sources}
        vector = self.regularizer.vector(params)
        self.vector = vector[:-1]
        alive = self.regularizer.alive(vector)[:-1]
        cost, _ = self.regularizer.terms.evaluate(alive, vector[:-1])
        self.alive_per_group = {g.id: int(alive[g.classes].sum()) for g in self.graph.groups if g.prunable}
        document = mask_document(self.graph, alive)
        self.structure = document["structure"]
        folder = log_dir / "learned_structure"
        folder.mkdir(exist_ok=True)
        (folder / f"alive_{step:05d}.json").write_text(json.dumps(self.structure, indent=1) + "\n")
        if final:
            # prune keeps one channel of every group: the masks revive each emptied group's strongest.
            kept = self.regularizer.kept(params)[:-1]
            for group in self.graph.groups:
                if not kept[group.classes].any():
                    kept[group.classes[np.argmax(vector[group.classes])]] = True
            (log_dir / "masks.json").write_text(json.dumps(mask_document(self.graph, kept)) + "\n")
        key = "effective_cost_after" if final else "effective_cost_structure"
        return {key: cost, **{f"alive/group_{g}": n for g, n in self.alive_per_group.items()}}


class _Logs:
    """train_log.csv (one row per step, columns fixed by the first row) and TensorBoard scalars."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self):
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.directory / "tensorboard"))
        self.csv_file = open(self.directory / "train_log.csv", "w", newline="")
        self.csv = None
        return self

    def write(self, record: dict) -> None:
        if self.csv is None:
            self.csv = csv.DictWriter(self.csv_file, fieldnames=list(record), extrasaction="ignore")
            self.csv.writeheader()
        self.csv.writerow(record)
        for key, value in record.items():
            if key not in ("step", "epoch"):
                self.tensorboard.add_scalar(key, value, record["step"])

    def __exit__(self, *exc):
        self.csv_file.close()
        self.tensorboard.close()


class _Progress:
    """One line per epoch, redrawn in place on a terminal and every tenth of the epoch otherwise."""

    def __init__(self, out: TextIO | None, label: str, total: int):
        self.out, self.label, self.total, self.done = out, label, max(total, 1), 0
        self.tty = bool(out is not None and hasattr(out, "isatty") and out.isatty())
        self.started = time.perf_counter()

    def update(self, record: dict) -> None:
        self.done += 1
        if self.out is None:
            return
        if not self.tty and self.done % max(self.total // 10, 1) and self.done != self.total:
            return
        filled = int(20 * self.done / self.total)
        text = (f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
                f"loss {record['task_loss']:.4f}")
        if "regularization" in record:
            text += f" reg {record['regularization']:.4g} cost {record['effective_cost']:.4g}"
        text += f" {time.perf_counter() - self.started:.0f}s"
        self.out.write(("\r" + text) if self.tty else text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None and self.tty:
            self.out.write("\n")


def _schedule(strength: float | Callable[[int], float]) -> Callable[[int], float]:
    if callable(strength):
        return strength
    if not (strength >= 0 and math.isfinite(strength)):
        raise OptionError(f"the strength must be a finite number >= 0, not {strength}")
    return lambda step: float(strength)


def _batches(data, batch_size: int, rng: np.random.Generator) -> Iterable[Batch]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        x, y = data
        if len(x) != len(y):
            raise OptionError(f"{len(x)} inputs but {len(y)} labels")
        order = rng.permutation(len(y))
        for start in range(0, len(y) - batch_size + 1 if len(y) >= batch_size else 1, batch_size):
            chosen = order[start:start + batch_size]
            yield x[chosen], y[chosen]
        return
    yield from data
