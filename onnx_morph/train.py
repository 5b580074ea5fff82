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

from onnx_morph.errors import OptionError, TrainingError
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.rewrite.training import CALIBRATION_BATCHES
from onnx_morph.rewrite.training.artifacts import STRENGTH, TrainingArtifacts, load_artifacts, native_stderr_silenced
from onnx_morph.rewrite.surgery.calibrate import recalibrated_batchnorm
from onnx_morph.rewrite.training.gates import fold_gates
from onnx_morph.rewrite.surgery.save import save_model
from onnx_morph.rewrite.surgery.select import mask_document
from onnx_morph.rewrite.surgery.verify import onnxruntime, onnxruntime_training
from onnx_morph.target import StrengthController, structure_at

Batch = tuple[np.ndarray, np.ndarray]


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
    moved_to_target: int = 0  # channels removed (> 0) or restored (< 0) at the end to put the structure at the target
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
    target: float | None = None,
    log_dir: str | os.PathLike | None = None,
    structure_every: int = 100,
    export: str | os.PathLike | None = None,
    test_data: Batch | None = None,
    seed: int = 0,
    progress: TextIO | None = sys.stderr,
) -> TrainResult:
    """Train for `epochs` over `data`: (x, y) arrays (shuffled, cut into batches of the artifacts'
    batch size; the last partial batch is dropped), or any re-iterable of (x, y) batches, numpy
    arrays or torch tensors, such as a list or a torch DataLoader (batches of another size than
    the artifacts' are skipped, as a DataLoader's last partial batch).

    `strength` overrides the artifacts' strength; a callable gets the step number (a schedule).
    `target` (in the regularized resource's units, see `onnx_morph.target.cost_target`) adapts the
    strength online until the effective cost holds at the target (`StrengthController`), and the
    final structure (masks.json, `structure`) is put at it (`onnx_morph.target.structure_at`).
    `log_dir` (default: the artifacts folder) receives train_log.csv, TensorBoard events and
    learned_structure/. With `export`, the trained inference model is written there, and with
    `test_data` its accuracy is measured in onnxruntime.
    """
    if not isinstance(artifacts, TrainingArtifacts):
        artifacts = load_artifacts(artifacts)
    _check_options(artifacts, data, epochs, batch_size)
    log_dir = Path(log_dir) if log_dir is not None else artifacts.directory
    log_dir.mkdir(parents=True, exist_ok=True)
    schedule = _schedule_for(artifacts, strength, target)
    tracker = _StructureTracker(artifacts, target)
    run = _Run(_Session(artifacts, learning_rate), schedule, tracker, log_dir, structure_every)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    with _Logs(log_dir) as logs:
        for epoch in range(epochs):
            batches = _batches(data, artifacts.batch_size, rng)
            if not batches:
                raise TrainingError(f"no batch of the data has {artifacts.batch_size} examples, the artifacts' "
                                    "batch size")
            run.epoch(epoch, batches, logs, _Progress(progress, f"epoch {epoch + 1}/{epochs}", len(batches)))
        final = run.final(logs, epochs)
    result = run.result(final, time.perf_counter() - started)
    if export is not None:
        trained = trained_model(artifacts, run.session.state, run.calibration, run.tracker.gates)
        result.model_path = save_model(trained, export, source=artifacts.base_model)
        if test_data is not None:
            result.test_accuracy = accuracy(trained, test_data)
    return result


@dataclass
class _Run:
    """One training run's state: the session, the strength schedule, the structure tracker, the log
    rows and the last batches (for calibrating BatchNorm statistics)."""

    session: _Session
    schedule: Callable[[int], float]
    tracker: _StructureTracker
    log_dir: Path
    structure_every: int
    history: list[dict] = field(default_factory=list)
    calibration: list[np.ndarray] = field(default_factory=list)

    def epoch(self, epoch: int, batches: list[Batch], logs: _Logs, bar: _Progress) -> None:
        """One optimizer step per batch, each logged (with the structure every `structure_every` steps)."""
        for x, y in batches:
            self.calibration = (self.calibration + [x])[:CALIBRATION_BATCHES]
            record = _record(len(self.history), epoch, self.session.step(x, y, self.schedule(len(self.history))),
                             self.schedule)
            if self.tracker.enabled and self.structure_every and record["step"] % self.structure_every == 0:
                record.update(self.tracker.record(self.session.state, self.log_dir, record["step"]))
            logs.write(record)
            self.history.append(record)
            bar.update(record)
        bar.close()

    def final(self, logs: _Logs, epochs: int) -> dict:
        """The final structure's record (masks.json written), logged; empty without a regularizer."""
        if not self.tracker.enabled:
            return {}
        final = self.tracker.record(self.session.state, self.log_dir, len(self.history), final=True)
        if final:
            logs.write({"step": len(self.history), "epoch": epochs, **final})
        return final

    def result(self, final: dict, seconds: float) -> TrainResult:
        last, tracker = self.history[-1], self.tracker
        return TrainResult(
            steps=len(self.history), task_loss=last["task_loss"], regularization=last.get("regularization"),
            effective_cost=final.get("effective_cost_after") if final else None,
            structure=tracker.structure, alive_per_group=tracker.alive_per_group, vector=tracker.vector,
            gate_logits={g.param: g.logits(self.session.state.parameters[g.param].data) for g in tracker.gates},
            moved_to_target=tracker.moved, seconds=seconds, history=self.history)


def _check_options(artifacts: TrainingArtifacts, data, epochs: int, batch_size: int | None) -> None:
    if epochs < 1:
        raise OptionError(f"epochs must be at least 1, not {epochs}")
    if batch_size is not None and batch_size != artifacts.batch_size:
        raise OptionError(f"the artifacts in {artifacts.directory} train with batches of {artifacts.batch_size}, "
                          f"not {batch_size}; regenerate them with batch_size {batch_size}")
    if not isinstance(data, tuple) and epochs > 1 and iter(data) is data:
        raise OptionError("the data is a one-pass iterator and training takes several epochs: pass a list, a "
                          "DataLoader or (x, y) arrays")


def _schedule_for(artifacts: TrainingArtifacts, strength, target: float | None) -> Callable[[int], float]:
    schedule = _schedule(strength if strength is not None else artifacts.strength)
    if target is None:
        return schedule
    if artifacts.regularizer is None:
        raise OptionError(f"the artifacts in {artifacts.directory} have no regularizer, so no cost to bring to a target")
    return StrengthController(schedule(0), target)


class _Session:
    """The onnxruntime-training module, optimizer and checkpoint state of one run."""

    def __init__(self, artifacts: TrainingArtifacts, learning_rate: float | None):
        onnxruntime().set_default_logger_severity(3)
        api = onnxruntime_training().api
        with native_stderr_silenced():
            self.state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
            self.module = api.Module(str(artifacts.training_model), self.state, str(artifacts.eval_model))
            self.optimizer = api.Optimizer(str(artifacts.optimizer_model), self.module)
        if learning_rate is not None:
            self.optimizer.set_learning_rate(learning_rate)
        self.names = self.module.input_names()
        self.input, self.labels = artifacts.inputs[0], artifacts.labels
        self.label_type = np.int64 if artifacts.loss == "cross-entropy" else np.float32
        self.module.train()

    def step(self, x: np.ndarray, y: np.ndarray, strength: float) -> list[float]:
        """One optimizer step; the outputs: loss, then (regularized) effective cost and regularization."""
        feeds = {self.input: x.astype(np.float32), self.labels: y.astype(self.label_type),
                 STRENGTH: np.array(strength, dtype=np.float32)}
        outputs = self.module(*[feeds[n] for n in self.names])
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return [float(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _record(step: int, epoch: int, outputs: list[float], schedule) -> dict:
    """The log row of one step; a strength controller learns the step's effective cost."""
    loss = outputs[0]
    if not math.isfinite(loss):
        raise TrainingError(f"training diverged at step {step} (loss {loss}); lower the learning rate or the strength")
    record = {"step": step, "epoch": epoch, "loss": loss, "task_loss": loss}
    if len(outputs) >= 3:
        cost, reg = outputs[1], outputs[2]
        record.update(task_loss=loss - schedule(step) * reg, regularization=reg, effective_cost=cost,
                      strength=schedule(step))
        if isinstance(schedule, StrengthController):
            schedule.update(cost)
    return record


def trained_model(artifacts: TrainingArtifacts, state, inputs: list[np.ndarray], gates=None) -> onnx.ModelProto:
    """The base model with the checkpoint's parameters and BatchNorm statistics measured on the
    `inputs` batches; probabilistic gates (`gates`: the regularizer's, rebuilt when None) are folded
    into their producers."""
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
    return recalibrated_batchnorm(model, inputs, artifacts.inputs[0])


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

    def __init__(self, artifacts: TrainingArtifacts, target: float | None = None):
        self.enabled = artifacts.regularizer is not None
        self.target = target
        self.moved = 0
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
        cost = self.regularizer.terms.cost(alive)
        self.alive_per_group = {g.id: int(alive[g.classes].sum()) for g in self.graph.groups if g.prunable}
        document = mask_document(self.graph, alive)
        self.structure = document["structure"]
        folder = log_dir / "learned_structure"
        folder.mkdir(exist_ok=True)
        (folder / f"alive_{step:05d}.json").write_text(json.dumps(self.structure, indent=1) + "\n")
        if final:
            kept = self._final_masks(params, vector[:-1])
            if self.target is not None:  # the learned structure is the one put at the target
                cost = self.regularizer.terms.cost(kept)
                self.structure = mask_document(self.graph, kept)["structure"]
                (folder / f"alive_{step:05d}.json").write_text(json.dumps(self.structure, indent=1) + "\n")
            (log_dir / "masks.json").write_text(json.dumps(mask_document(self.graph, kept)) + "\n")
        key = "effective_cost_after" if final else "effective_cost_structure"
        return {key: cost, **{f"alive/group_{g}": n for g, n in self.alive_per_group.items()}}

    def _final_masks(self, params: dict, vector: np.ndarray) -> np.ndarray:
        """What `prune --mask` keeps: alive (and open) channels, one at least in every group (the
        strongest), and with a target, the weakest removed until the cost meets it."""
        kept = self.regularizer.kept(params)[:-1]
        groups = [g.classes for g in self.graph.groups]
        for classes in groups:
            if classes.size and not kept[classes].any():
                kept[classes[np.argmax(vector[classes])]] = True
        if self.target is not None:
            before = int(kept.sum())
            kept = structure_at(self.target, kept, vector, ~self.regularizer.fixed[:-1], groups,
                              self.regularizer.terms.cost)
            self.moved = before - int(kept.sum())
        return kept


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


def _batches(data, batch_size: int, rng: np.random.Generator) -> list[Batch]:
    """One epoch of (x, y) numpy batches of exactly `batch_size` examples."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        x, y = data
        if len(x) != len(y):
            raise OptionError(f"{len(x)} inputs but {len(y)} labels")
        order = rng.permutation(len(y))
        return [(x[order[s:s + batch_size]], y[order[s:s + batch_size]])
                for s in range(0, len(y) - batch_size + 1, batch_size)]
    batches = []
    for item in data:
        try:
            x, y = (_numpy(v) for v in item)
        except (TypeError, ValueError):
            raise OptionError(f"each batch of the data must be a pair (inputs, labels), not {type(item).__name__}") from None
        if len(x) != len(y):
            raise OptionError(f"a batch has {len(x)} inputs but {len(y)} labels")
        if len(x) == batch_size:
            batches.append((x, y))
    return batches


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)
