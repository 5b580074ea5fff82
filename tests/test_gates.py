"""Probabilistic gates (FiGS, MorphNet's LogisticSigmoid regularizer) on a CNN without BatchNorm: the
training graph computes the numpy regularizer, training shrinks the effective FLOPs, and the trained
model carries no gate and prunes to the same function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_checks import assert_user_error
from onnx import numpy_helper
from torch import nn

from onnx_morph.data import load_dataset
from onnx_morph.errors import OptionError
from onnx_morph.examples import export
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.training.artifacts import STRENGTH, load_artifacts, make_training_artifacts
from onnx_morph.rewrite.training.gates import fold_gates
from onnx_morph.rewrite.training.regularizer import GATE_LOGIT_SCALE, GATE_PREFIX, RegularizerOptions, build_regularizer
from onnx_morph.rewrite.training.expression import NumpyBackend, cost_and_regularization
from onnx_morph.rewrite.training.training_graph import PREFIX, add_gates, deterministic_gates
from onnx_morph.rewrite.surgery.verify import onnxruntime
from onnx_morph.train import train

ROOT = Path(__file__).resolve().parent.parent


class GateNet(nn.Module):
    """No BatchNorm: convs with biases, ReLU, a residual add (stem and back share channels), Flatten->Linear."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.body = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.back = nn.Conv2d(2 * width, width, 1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.back(torch.relu(self.body(x))))
        return self.head(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export(GateNet(), (1, 1, 8, 8), tmp_path_factory.mktemp("gates") / "gatenet.onnx")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _module(artifacts):
    onnxruntime().set_default_logger_severity(3)
    from onnxruntime.training import api

    state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    return state, api.Module(str(artifacts.training_model), state, str(artifacts.eval_model))


def _run(module, artifacts, x, y, strength: float = 0.5) -> list[float]:
    feeds = {artifacts.inputs[0]: x, artifacts.labels: y, STRENGTH: np.array(strength, np.float32)}
    return [float(v) for v in module(*[feeds[n] for n in module.input_names()])]


def _session(model: onnx.ModelProto):
    return onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _stored(gates, logits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trainable parameters that hold `logits`."""
    return {g.param: (logits[g.param] / g.logit_scale).astype(np.float32) for g in gates}


def _gated_eval(model: onnx.ModelProto, gates, logits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with its gates as in the eval graph (mask = logit > 0) and the given logits."""
    gated = deterministic_gates(add_gates(model, gates, temperature=0.5), gates)
    stored = _stored(gates, logits)
    for tensor in gated.graph.initializer:
        if tensor.name in stored:
            tensor.CopyFrom(numpy_helper.from_array(stored[tensor.name], tensor.name))
    return gated


@pytest.mark.parametrize("cost, scale", [("flops", GATE_LOGIT_SCALE), ("params", 2.5), ("activations", 1.0),
                                         ("latency:V100", GATE_LOGIT_SCALE)])
def test_training_graph_computes_the_numpy_regularizer(model, tmp_path, digits, cost, scale):
    """Random logits, stored as logit / scale: the graph's regularization and effective cost are the numpy
    ones, and the residual group's two gates combine by 1 - (1 - p1)(1 - p2), not by max."""
    options = RegularizerOptions(kind="gates", cost=cost, gate_logit_scale=scale)
    artifacts = make_training_artifacts(model, tmp_path / "art", regularizer=options, batch_size=16)
    regularizer = options.build(build_channel_graph(load_model(artifacts.base_model)))
    assert [g.node for g in regularizer.gates] == ["/stem/Conv", "/body/Conv", "/back/Conv"]
    assert artifacts.initial_cost == artifacts.total_cost
    state, module = _module(artifacts)
    for gate in regularizer.gates:
        np.testing.assert_allclose(np.asarray(state.parameters[gate.param].data), 2.5 / scale, rtol=1e-6)

    rng = np.random.default_rng(0)
    logits = {g.param: rng.normal(0.0, 2.0, g.channels) for g in regularizer.gates}
    stored = _stored(regularizer.gates, logits)
    for name, value in stored.items():
        state.parameters[name].data = value
    module.train()
    _, graph_cost, graph_reg = _run(module, artifacts, digits.x_train[:16], digits.y_train[:16])
    python_cost, python_reg = regularizer.evaluate(stored)
    assert graph_cost == pytest.approx(python_cost, rel=1e-5)
    assert graph_reg == pytest.approx(python_reg, rel=1e-5)
    assert python_cost < artifacts.total_cost

    p = [1 / (1 + np.exp(-logits[s.param].astype(np.float64))) for s in regularizer.sources]
    values = np.concatenate(p + [np.zeros(1)])
    stem = regularizer.gates[0]
    tied = build_channel_graph(load_model(artifacts.base_model)).classes(stem.tensor)
    assert (regularizer.gather[:, tied] != regularizer.zero_position).sum(axis=0).tolist() == [2] * stem.channels
    np.testing.assert_allclose(regularizer.vector(stored)[tied], 1 - (1 - p[0]) * (1 - p[2]), rtol=1e-6)
    alive = regularizer.alive(regularizer.vector(stored))[:-1]
    _, max_reg = cost_and_regularization(NumpyBackend(), regularizer.polynomial, np.append(alive, 1.0),
                                         values[regularizer.gather].max(axis=0))
    assert abs(graph_reg - max_reg) > 1e-3 * graph_reg


def test_group_lasso_works_without_batchnorm(model, tmp_path, digits):
    options = RegularizerOptions(kind="group-lasso", cost="flops", threshold=0.15)
    artifacts = make_training_artifacts(model, tmp_path / "art", regularizer=options, batch_size=16)
    graph = build_channel_graph(load_model(artifacts.base_model))
    regularizer = options.build(graph)
    _, module = _module(artifacts)
    module.train()
    _, graph_cost, graph_reg = _run(module, artifacts, digits.x_train[:16], digits.y_train[:16])
    python_cost, python_reg = regularizer.evaluate({s.param: graph.model.constant(s.param) for s in regularizer.sources})
    assert (graph_cost, graph_reg) == (pytest.approx(python_cost, rel=1e-5), pytest.approx(python_reg, rel=1e-5))
    assert python_reg > 0


def test_eval_graph_is_deterministic_and_training_stochastic(model, tmp_path, digits):
    for straight_through in (False, True):
        options = RegularizerOptions(kind="gates", straight_through=straight_through)
        artifacts = make_training_artifacts(model, tmp_path / f"st{straight_through}", regularizer=options,
                                            batch_size=16)
        state, module = _module(artifacts)
        x, y = digits.x_train[:16], digits.y_train[:16]
        module.train()
        module.lazy_reset_grad()
        trained = [_run(module, artifacts, x, y, strength=0.0)[0] for _ in range(4)]
        assert len(set(trained)) > 1, trained
        gate = next(n for n in artifacts.trainable if n.startswith(GATE_PREFIX))
        assert np.abs(np.asarray(state.parameters[gate].grad)).max() > 0  # the task loss reaches the logits
        module.eval()
        evaluated = [_run(module, artifacts, x, y, strength=0.0)[0] for _ in range(2)]
        assert evaluated[0] == evaluated[1]
        eval_ops = {n.op_type for n in onnx.load(str(artifacts.eval_model)).graph.node}
        assert "RandomUniform" not in eval_ops
        assert "RandomUniform" in {n.op_type for n in onnx.load(str(artifacts.training_model)).graph.node}


def test_folding_equals_the_gated_eval_model(model, digits):
    """Folding the 0/1 masks into the producers' weights and biases computes what the gated model does."""
    base = onnx.load(str(model))
    regularizer = build_regularizer(build_channel_graph(load_model(base)), kind="gates", cost="flops")
    rng = np.random.default_rng(1)
    logits = {g.param: rng.normal(0.0, 1.0, g.channels) for g in regularizer.gates}
    gated = _gated_eval(base, regularizer.gates, logits)
    folded = fold_gates(onnx.load(str(model)), regularizer.gates, _stored(regularizer.gates, logits))
    x = digits.x_test[:32]
    want = _session(gated).run(None, {"input": x})[0]
    got = _session(folded).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, _session(base).run(None, {"input": x})[0], atol=1e-3)


def bn_gate_net() -> nn.Module:
    """Conv -> BatchNorm (shifted statistics and beta) -> ReLU -> Conv with bias -> Linear, for 8x8 inputs."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def test_gates_everywhere_sit_after_batchnorm_and_fold_into_it(tmp_path, digits):
    """On a BatchNorm network a gate before the BatchNorm would be normalized away: it goes after it,
    and folds into the BatchNorm's scale and shift."""
    net = bn_gate_net()
    path = export(net, (1, 1, 8, 8), tmp_path / "bn.onnx")
    graph = build_channel_graph(load_model(path))
    assert [g.node for g in build_regularizer(graph, kind="gates").gates] == ["/3/Conv"]
    regularizer = build_regularizer(graph, kind="gates", gates_everywhere=True)
    assert [(g.node, len(g.fold)) for g in regularizer.gates] == [("/1/BatchNormalization", 2), ("/3/Conv", 2)]
    logits = {g.param: np.array([-1.0, 2.0] * (g.channels // 2)) for g in regularizer.gates}
    gated = _gated_eval(onnx.load(str(path)), regularizer.gates, logits)
    folded = fold_gates(onnx.load(str(path)), regularizer.gates, _stored(regularizer.gates, logits))
    x = digits.x_test[:16]
    np.testing.assert_allclose(_session(folded).run(None, {"input": x})[0], _session(gated).run(None, {"input": x})[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(OptionError, match="gates_everywhere applies to the gates regularizer"):
        build_regularizer(graph, kind="gamma", gates_everywhere=True)


def test_pruning_keeps_only_channels_open_in_the_eval_graph(model):
    """A channel whose gates are all closed (logit <= 0) is zero in the eval graph: pruning drops it even
    while its probability (>= 0.1) still counts it alive; one open gate on a residual channel keeps it."""
    graph = build_channel_graph(load_model(model))
    regularizer = RegularizerOptions(kind="gates", cost="flops").build(graph)
    stem, body, back = regularizer.gates
    logits = {stem.param: np.array([1.0, -1.0, -5.0, -1.0, -5, -5, -5, -5]),
              back.param: np.array([-5.0, 1.0, -1.0, -5.0, -5, -5, -5, -5]),
              body.param: np.array([-1.0] * 4 + [2.0] * 12)}
    stored = _stored(regularizer.gates, logits)
    alive = regularizer.alive(regularizer.vector(stored))
    kept = regularizer.kept(stored)
    stream, inner = graph.classes(stem.tensor), graph.classes(body.tensor)
    assert alive[stream].tolist() == [True, True, True, True, False, False, False, False]
    assert kept[stream].tolist() == [True, True, False, False, False, False, False, False]
    assert alive[inner].all() and kept[inner].tolist() == [False] * 4 + [True] * 12


def test_training_shrinks_and_the_trained_model_prunes_exactly(model, tmp_path, digits):
    """At a small learning rate the logit scale closes gates: AdamW moves a stored parameter by about the
    learning rate per step, so a logit falls from 2.5 to below logit(0.1) = -2.2 in ~94 steps at 0.005
    with the default scale 10, and in ~940 (more than this run has) with scale 1."""
    data = (digits.x_train, digits.y_train)
    unscaled = make_training_artifacts(model, tmp_path / "unscaled", batch_size=16,
                                       regularizer=RegularizerOptions(kind="gates", cost="flops", gate_logit_scale=1.0))
    stuck = train(unscaled, data, epochs=3, learning_rate=0.005, strength=3 * unscaled.strength, progress=None,
                  structure_every=0)
    assert stuck.effective_cost == pytest.approx(unscaled.total_cost)

    options = RegularizerOptions(kind="gates", cost="flops")
    artifacts = make_training_artifacts(model, tmp_path / "art", regularizer=options, batch_size=16)
    result = train(artifacts, data, epochs=3, learning_rate=0.005, strength=3 * artifacts.strength,
                   export=tmp_path / "trained.onnx", test_data=(digits.x_test, digits.y_test), progress=None,
                   structure_every=10)
    assert result.steps == stuck.steps < 400
    initial = result.history[0]["effective_cost"]
    assert initial == pytest.approx(artifacts.total_cost)
    assert result.effective_cost < 0.8 * initial
    assert result.test_accuracy > 0.5

    trained = onnx.load(str(result.model_path))
    assert not [n.name for n in trained.graph.node if n.name.startswith(PREFIX) or n.op_type == "Mul"]
    assert not [t.name for t in trained.graph.initializer if t.name.startswith(PREFIX)]

    masks = json.loads((artifacts.directory / "masks.json").read_text())
    pruned = prune(result.model_path, Mask(masks))
    assert pruned.after.flops < 0.8 * pruned.before.flops
    # Channels counted alive (p >= 0.1) but closed (logit <= 0) are zero in the trained model, and go.
    assert pruned.after.flops <= result.effective_cost * (1 + 1e-9)

    regularizer = options.build(build_channel_graph(load_model(artifacts.base_model)))
    gated = _gated_eval(trained, regularizer.gates, result.gate_logits)
    x = digits.x_test[:64]
    want = _session(gated).run(None, {"input": x})[0]
    got = _session(pruned.model).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "onnx_morph.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT, check=False)


def test_regularize_command_with_gates(model, tmp_path):
    out = tmp_path / "art"
    proc = _cli("regularize", model, "-o", out, "--regularizer", "gates", "--gate-temperature", "0.3",
                "--straight-through", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "regularizer: gates on flops" in proc.stdout
    saved = json.loads((out / "morph.json").read_text())["regularizer"]
    assert (saved["kind"], saved["gate_temperature"], saved["straight_through"]) == ("gates", 0.3, True)
    assert saved["gate_logit_scale"] == GATE_LOGIT_SCALE

    assert_user_error(_cli("regularize", model, "-o", tmp_path / "b", "--regularizer", "gates",
                           "--gate-temperature", "0"), "gate temperature", "> 0")
    assert_user_error(_cli("regularize", model, "-o", tmp_path / "c", "--straight-through"),
                      "apply to the gates regularizer")
    for bad in ("0", "-1", "inf"):
        assert_user_error(_cli("regularize", model, "-o", tmp_path / "d", "--regularizer", "gates",
                               "--gate-logit-scale", bad), "gate logit scale", "> 0")
    assert_user_error(_cli("regularize", model, "-o", tmp_path / "e", "--gate-logit-scale", "3"),
                      "apply to the gates regularizer")
    assert not [p for p in ("b", "c", "d", "e") if (tmp_path / p).exists()]


def test_artifacts_made_before_the_logit_scale_load_with_scale_1(model, tmp_path):
    """Their graphs use the stored parameters as logits."""
    artifacts = make_training_artifacts(model, tmp_path / "art", regularizer=RegularizerOptions(kind="gates"),
                                        batch_size=16)
    config = artifacts.directory / "morph.json"
    saved = json.loads(config.read_text())
    assert load_artifacts(artifacts.directory).regularizer.gate_logit_scale == GATE_LOGIT_SCALE
    del saved["regularizer"]["gate_logit_scale"]
    config.write_text(json.dumps(saved))
    assert load_artifacts(artifacts.directory).regularizer.gate_logit_scale == 1.0


def test_torch_regularizer_places_the_same_gates(model):
    """The torch path (tests/test_torch_gates.py) gates the tensors this route gates."""
    from onnx_morph.torch import MorphNetRegularizer

    reg = MorphNetRegularizer(GateNet(), torch.zeros(1, 1, 8, 8), regularizer="gates")
    route = RegularizerOptions(kind="gates").build(build_channel_graph(load_model(model)))
    where = lambda gates: [(g.param, g.tensor, g.node, g.axis, g.rank, g.channels) for g in gates]  # noqa: E731
    assert where(reg.spec.gates) == where(route.gates)
