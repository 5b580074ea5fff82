"""onnxruntime-training artifacts for MorphNet: the training, eval and optimizer models and a checkpoint.

The training loss is the task loss plus `morph_strength * regularization`; the strength is a
rank-0 graph input, so a schedule can change it every step without regenerating artifacts. The
directory also holds `base_model.onnx` (the inference model the trained weights go back into) and
`morph.json` (how the artifacts were made, for `onnx_morph.train`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from onnx_morph.costs.params import param_uses
from onnx_morph.errors import OptionError, OutputError
from onnx_morph.graph import ChannelGraph, build_channel_graph, load_model
from onnx_morph.rewrite.training import BATCH_SIZE
from onnx_morph.rewrite.training.batch import flexible_batch
from onnx_morph.rewrite.training.regularizer import Regularizer, RegularizerOptions
from onnx_morph.rewrite.training.training_graph import (
    EFFECTIVE_COST, REGULARIZATION, add_gates, add_regularizer, deterministic_gates, eval_form, trainable,
    unshare_initializers, with_batch_size,
)
from onnx_morph.rewrite.surgery.verify import onnxruntime, onnxruntime_training, runtime_errors

STRENGTH = "morph_strength"
CONFIG = "morph.json"
BASE_MODEL = "base_model.onnx"
CONFIG_FORMAT = "onnx-morph-training"
STAGING = "onnx-morph-staging-"
LOSSES = {"cross-entropy": "labels", "mse": "target", "bce": "target"}
OPTIMIZERS = ("adamw", "sgd")
# onnxruntime-training 1.19.2 loads models up to this IR version.
MAX_IR_VERSION = 10


class _InDirectory:
    """A file of the artifacts' directory, read as an attribute (`artifacts.eval_model`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, artifacts: TrainingArtifacts, owner: type) -> Path:
        return artifacts.directory / self.name


@dataclass
class TrainingArtifacts:
    """What `make_training_artifacts` wrote, and the model's cost before training."""

    directory: Path
    inputs: list[str]
    labels: str
    loss: str
    strength: float
    regularizer: RegularizerOptions | None
    trainable: list[str]
    batch_size: int = BATCH_SIZE
    total_cost: float | None = None
    initial_cost: float | None = None
    initial_regularization: float | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    training_model = _InDirectory("training_model.onnx")
    eval_model = _InDirectory("eval_model.onnx")
    optimizer_model = _InDirectory("optimizer_model.onnx")
    checkpoint = _InDirectory("checkpoint")
    base_model = _InDirectory(BASE_MODEL)

    def to_json(self) -> dict:
        data = asdict(self)
        data["directory"] = None
        data["format"] = CONFIG_FORMAT
        return data


def load_artifacts(directory: str | os.PathLike) -> TrainingArtifacts:
    """The description `make_training_artifacts` left in `directory`."""
    directory = Path(directory)
    config = directory / CONFIG
    if not config.is_file():
        raise OptionError(f"{directory}: not an onnx-morph training directory (no {CONFIG}); "
                          "make one with `onnx-morph regularize model.onnx -o DIR`")
    try:
        data = json.loads(config.read_text())
        if data.pop("format", None) != CONFIG_FORMAT:
            raise OptionError(f"{config}: not an onnx-morph training description")
        data["directory"] = directory
        if data["regularizer"] is not None:
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["regularizer"].items()}
            if options["kind"] == "gates":
                options.setdefault("gate_logit_scale", 1.0)  # graphs made before the scale stored the logits
            data["regularizer"] = RegularizerOptions(**options)
        return TrainingArtifacts(**data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise OptionError(f"{config}: a corrupt training description ({type(exc).__name__}: {exc}); make the "
                          "artifacts again with `onnx-morph regularize`") from None


def make_training_artifacts(
    model: str | os.PathLike | onnx.ModelProto,
    out_dir: str | os.PathLike,
    *,
    loss: str | object = "cross-entropy",
    regularizer: RegularizerOptions | None = RegularizerOptions(),
    strength: float | None = None,
    optimizer: str = "adamw",
    batch_size: int = BATCH_SIZE,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    overwrite: bool = False,
) -> TrainingArtifacts:
    """Write onnxruntime-training artifacts for `model` into `out_dir`.

    `loss` is cross-entropy, mse, bce (with logits) on the model's first output, or an
    onnxblock.Block that adds its own loss (its `build` gets the model's output names). With a
    regularizer, the default strength is MorphNet's starting point, 1 / (initial regularization
    value), which makes the regularization term start near 1. `regularizer=None` gives plain
    training artifacts (fine-tuning a pruned model).
    """
    _check_options(loss, strength, optimizer, batch_size)
    out_dir = Path(out_dir)
    _check_target(out_dir, model, overwrite)
    onnxruntime_training()  # before any work: the one-line reason when it is missing

    loaded = load_model(model, input_shapes)
    base, graph, notes = _base_model(loaded)
    reg = regularizer.build(graph) if regularizer is not None else None
    params = trained_parameters(graph, reg)
    training = with_batch_size(trainable(base), batch_size)
    costs = _Costs()
    if reg is not None:
        if reg.gates:
            training = add_gates(training, reg.gates, temperature=regularizer.gate_temperature,
                                 straight_through=regularizer.straight_through)
        training = add_regularizer(training, reg)
        costs = _initial_costs(graph, reg)
        strength = costs.starting_strength() if strength is None else strength
    else:
        strength = 0.0
    labels = LOSSES.get(loss, "labels") if isinstance(loss, str) else "labels"
    inputs = [i.name for i in base.graph.input if i.name not in {t.name for t in base.graph.initializer}]
    artifacts = TrainingArtifacts(
        directory=out_dir, inputs=inputs, labels=labels, loss=loss if isinstance(loss, str) else type(loss).__name__,
        strength=float(strength), regularizer=regularizer, trainable=sorted(params), batch_size=batch_size,
        input_shapes={k: list(v) for k, v in loaded.input_shapes.items()}, notes=notes, **asdict(costs))

    def write(staging: Path) -> None:
        _generate(training, base, params, loss, reg, optimizer, staging)
        onnx.save(base, str(staging / BASE_MODEL))
        (staging / CONFIG).write_text(json.dumps(artifacts.to_json(), indent=1) + "\n")

    _write_whole(out_dir, write)
    return artifacts


@dataclass
class _Costs:
    """The model's cost before training: all channels alive, and as the initial parameters leave them."""

    total_cost: float | None = None
    initial_cost: float | None = None
    initial_regularization: float | None = None

    def starting_strength(self) -> float:
        """MorphNet's starting point, 1 / (initial regularization value): the term starts near 1."""
        if self.initial_regularization > 0:
            return 1.0 / self.initial_regularization
        return 1.0 / max(self.total_cost, 1.0)


def _initial_costs(graph: ChannelGraph, reg: Regularizer) -> _Costs:
    total_cost = reg.terms.cost(np.ones(graph.num_classes, dtype=bool))
    initial_cost, initial_reg = reg.evaluate(_values(graph, reg))
    return _Costs(total_cost, initial_cost, initial_reg)


def _write_whole(out_dir: Path, write) -> None:
    """`write(folder)` into a staging folder next to `out_dir`, which replaces `out_dir` only once complete."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.{STAGING}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{STAGING}", dir=out_dir.parent))
    try:
        write(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_options(loss, strength: float | None, optimizer: str, batch_size: int) -> None:
    if batch_size < 1:
        raise OptionError(f"the batch size must be at least 1, not {batch_size}")
    if optimizer not in OPTIMIZERS:
        raise OptionError(f"unknown optimizer '{optimizer}': use one of {', '.join(OPTIMIZERS)}")
    if isinstance(loss, str) and loss not in LOSSES:
        raise OptionError(f"unknown loss '{loss}': use one of {', '.join(LOSSES)}, or an onnxblock.Block")
    if strength is not None and not (strength >= 0 and strength != float("inf")):
        raise OptionError(f"the strength must be a finite number >= 0, not {strength}")


def _base_model(loaded) -> tuple[onnx.ModelProto, ChannelGraph, list[str]]:
    """The inference model the trained weights go back into: one initializer per use, float, and
    batch-flexible (with a note when that changed it); and its channel graph."""
    base = unshare_initializers(loaded.materialized())
    graph = build_channel_graph(load_model(base, loaded.input_shapes))
    _check_float(graph)
    flexible = flexible_batch(graph)
    if flexible.model is None:
        return base, graph, []
    return flexible.model, build_channel_graph(load_model(flexible.model, loaded.input_shapes)), [flexible.note]


@contextmanager
def native_stderr_silenced():
    """onnxruntime-training's graph builders log every transformer at info level to the process's
    stderr, whatever the logger severity; failures still arrive as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def trained_parameters(graph: ChannelGraph, regularizer: Regularizer | None = None) -> set[str]:
    """Float initializers the cost model counts as parameters (weights, biases, norm scales and
    shifts), seen through weight views and constant subgraphs (a gathered position table, a class
    token, a weight-normalized weight); everything else (running statistics, shapes) stays frozen."""
    names = set()
    for node, use in param_uses(graph).items():
        candidates = [t.param for t in use.terms]
        if use.per_pair:
            candidates.append(graph.relations[node].geometry.weight)
        for name in candidates:
            names.update(s for s in graph.trained_sources(name)
                         if graph.model.initializer(s).data_type == TensorProto.FLOAT)
    if regularizer is not None:
        names |= {s.param for s in regularizer.sources}
    return names


def _values(graph: ChannelGraph, reg: Regularizer) -> dict:
    if reg.gates:
        return reg.initial_gate_parameters()
    return {s.param: graph.model.constant(s.param) for s in reg.sources}


def _check_float(graph: ChannelGraph) -> None:
    for value in list(graph.model.graph.input) + list(graph.model.graph.output):
        elem = value.type.tensor_type.elem_type
        if graph.model.initializer(value.name) is None and elem not in (
                TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32):
            raise OptionError(f"{graph.model.source}: graph input/output '{value.name}' is "
                              f"{TensorProto.DataType.Name(elem)}; training needs a float32 model")


def _check_target(out_dir: Path, model, overwrite: bool) -> None:
    if isinstance(model, (str, os.PathLike)) and out_dir.resolve() == Path(model).resolve():
        raise OptionError(f"the output directory {out_dir} is the input model")
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir} exists and is not empty; choose another directory or pass overwrite=True (--force)")
    if not out_dir.parent.exists():
        raise OptionError(f"the folder {out_dir.parent} does not exist")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder into place; an old output leaves only after the new one is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _generate(training: onnx.ModelProto, base: onnx.ModelProto, params: set[str], loss, reg: Regularizer | None,
              optimizer: str, directory: Path) -> None:
    regularized = reg is not None
    onnxruntime().set_default_logger_severity(3)
    runtime = onnxruntime_training()
    artifacts, onnxblock = runtime.artifacts, runtime.onnxblock

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    task = {"cross-entropy": onnxblock.loss.CrossEntropyLoss, "mse": onnxblock.loss.MSELoss,
            "bce": onnxblock.loss.BCEWithLogitsLoss}[loss]() if isinstance(loss, str) else loss
    first_output = base.graph.output[0].name

    class MorphNetLoss(onnxblock.Block):
        """The task loss on the model's first output, plus morph_strength * regularization."""

        def __init__(self):
            super().__init__()
            self.task, self.add, self.mul = task, onnxblock.blocks.Add(), onnxblock.blocks.Mul()

        def build(self, *outputs):
            task_loss = self.task(first_output) if isinstance(loss, str) else self.task(*outputs[:len(base.graph.output)])
            if not regularized:
                return task_loss
            strength = onnxblock.blocks.InputLike(REGULARIZATION)(STRENGTH)
            return self.add(task_loss, self.mul(strength, REGULARIZATION))

    frozen = [t.name for t in training.graph.initializer if t.name not in params]
    try:
        with native_stderr_silenced():
            artifacts.generate_artifacts(
                training, requires_grad=sorted(params), frozen_params=frozen, loss=MorphNetLoss(),
                optimizer={"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[optimizer],
                artifact_directory=str(directory),
                additional_output_names=[EFFECTIVE_COST, REGULARIZATION] if regularized else None)
    except (RuntimeError, onnx.shape_inference.InferenceError, onnx.checker.ValidationError,
            *runtime_errors(onnxruntime())) as exc:
        message = str(exc)
        if "gradient builder has not been registered" in message:
            detail = message.split("has not been registered:")[-1].strip()
            raise OptionError(f"onnxruntime-training has no gradient for {detail}; re-export the model without "
                              "that op (see README, Training)") from None
        first = " ".join(message.split())[:300]
        raise OptionError(f"onnxruntime-training cannot build the training graph of this model: {first}") from None
    _finish(directory, reg)


def _finish(directory: Path, reg: Regularizer | None) -> None:
    """The generated models as onnxruntime loads them: the eval graph in its handlers' eval form with
    deterministic gates, and every model at an IR version onnxruntime-training 1.19.2 reads."""
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = directory / name
        artifact = onnx.load(str(path))
        if name == "eval_model.onnx":
            eval_form(artifact)
            if reg is not None and reg.gates:
                deterministic_gates(artifact, reg.gates)
        artifact.ir_version = min(artifact.ir_version, MAX_IR_VERSION)
        onnx.save(artifact, str(path))
