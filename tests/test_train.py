"""MorphNet's regularizer in onnxruntime-training: the graph computes the cost model's values, the
strength steers real training runs on digits, and the logs and exported model agree with `analyze`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from cli_checks import assert_user_error
from onnx_morph import analyze
from onnx_morph.data import load_dataset
from onnx_morph.examples import export
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.costs import op_costs
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.surgery.select import by_mask_document
from onnx_morph.rewrite.training.artifacts import load_artifacts, make_training_artifacts
from onnx_morph.rewrite.training.regularizer import RegularizerOptions
from onnx_morph.train import train

SCRIPT = Path(sys.executable).parent / "onnx-morph"
THRESHOLD = 0.3


class CoupledNet(nn.Module):
    """A residual add, a concat, a depthwise conv and a Flatten->Gemm head, for 1x8x8 digits."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False),
                                       nn.BatchNorm2d(2 * w), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(2 * w, w, 1, bias=False), nn.BatchNorm2d(w))
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(w * 4 * 4, classes)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        x = torch.relu(x + self.project(self.depthwise(y)))
        return self.head(torch.flatten(self.pool(x), 1))


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export(CoupledNet(), (1, 1, 8, 8), tmp_path_factory.mktemp("fresh") / "coupled.onnx")


@pytest.fixture(scope="module")
def scattered(tmp_path_factory) -> Path:
    """Gammas spread over [-1, 1], so a threshold of 0.3 leaves some channels dead."""
    torch.manual_seed(1)
    net = CoupledNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(-1, 1)
                module.bias.uniform_(-0.1, 0.1)
    return export(net, (1, 1, 8, 8), tmp_path_factory.mktemp("scattered") / "coupled.onnx")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _forward(artifacts, x: np.ndarray, y: np.ndarray) -> list[float]:
    from onnxruntime.training import api

    state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    module = api.Module(str(artifacts.training_model), state, str(artifacts.eval_model))
    feeds = {artifacts.inputs[0]: x, artifacts.labels: y, "morph_strength": np.array(0.5, np.float32)}
    return [float(v) for v in module(*[feeds[n] for n in module.input_names()])]


@pytest.mark.parametrize("cost,field", [("flops", "flops"), ("params", "params"),
                                        ("activations", "activations"), ("latency:V100", "latency_s")])
@pytest.mark.parametrize("kind", ["gamma", "group-lasso"])
def test_training_graph_computes_the_cost_model(scattered, tmp_path, digits, cost, field, kind):
    threshold = THRESHOLD if kind == "gamma" else 0.15
    options = RegularizerOptions(kind=kind, cost=cost, threshold=threshold, l1_fraction=0.25)
    artifacts = make_training_artifacts(scattered, tmp_path / "art", regularizer=options, batch_size=16)
    loss, graph_cost, graph_reg = _forward(artifacts, digits.x_train[:16], digits.y_train[:16])

    graph = build_channel_graph(load_model(artifacts.base_model))
    regularizer = options.build(graph)
    params = {s.param: graph.model.constant(s.param) for s in regularizer.sources}
    python_cost, python_reg = regularizer.evaluate(params)
    assert graph_cost == pytest.approx(python_cost, rel=1e-5)
    assert graph_reg == pytest.approx(python_reg, rel=1e-5)
    assert loss > 0.5 * graph_reg

    # Independently of the regularizer's terms: analyze's per-op cost model under the same threshold.
    thresholds = {"gamma_threshold": threshold} if kind == "gamma" else {}
    if kind == "gamma":
        report = analyze(artifacts.base_model, cost=cost, **thresholds)
        assert graph_cost == pytest.approx(getattr(report.effective, field), rel=1e-5)
        assert getattr(report.effective, field) < getattr(report.total, field)
        assert artifacts.total_cost == pytest.approx(getattr(report.total, field), rel=1e-9)


def test_strength_zero_trains_like_no_regularizer(fresh, tmp_path, digits):
    data = (digits.x_train[:320], digits.y_train[:320])
    models = []
    for name, options in (("zero", RegularizerOptions()), ("plain", None)):
        artifacts = make_training_artifacts(fresh, tmp_path / name, regularizer=options, strength=0.0)
        train(artifacts, data, epochs=1, learning_rate=0.01, export=tmp_path / f"{name}.onnx", progress=None,
              structure_every=0)
        models.append({t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"{name}.onnx")).graph.initializer})
    zero, plain = models
    assert zero.keys() == plain.keys()
    changed = 0
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "plain" / "base_model.onnx")).graph.initializer}
    for name in plain:
        np.testing.assert_allclose(zero[name], plain[name], rtol=1e-5, atol=1e-6, err_msg=name)
        changed += name in original and not np.allclose(original[name], plain[name])
    assert changed >= 10


@pytest.fixture(scope="module")
def strength_runs(fresh, tmp_path_factory, digits):
    """The same 10 epochs on digits at 0.1x, 1x and 10x MorphNet's default strength."""
    runs = []
    for multiple in (0.1, 1.0, 10.0):
        folder = tmp_path_factory.mktemp(f"strength{multiple}")
        artifacts = make_training_artifacts(fresh, folder / "art", regularizer=RegularizerOptions(threshold=0.05))
        result = train(artifacts, (digits.x_train, digits.y_train), epochs=10, learning_rate=0.02,
                       strength=multiple * artifacts.strength, export=folder / "trained.onnx",
                       test_data=(digits.x_test, digits.y_test), structure_every=50, progress=None)
        runs.append((artifacts, result))
    return runs


def _mean_abs_gamma(path: Path) -> float:
    graph = build_channel_graph(load_model(path))
    gammas = [np.abs(graph.model.constant(s.param)) for g in graph.groups for s in g.sources if s.kind == "gamma"]
    return float(np.mean(np.concatenate(gammas)))


def test_larger_strength_gives_lower_effective_cost(strength_runs, fresh):
    costs = [result.effective_cost for _, result in strength_runs]
    total = strength_runs[0][0].total_cost
    assert costs[0] > costs[1] > costs[2]
    assert costs[2] < 0.6 * total
    gammas = [_mean_abs_gamma(result.model_path) for _, result in strength_runs]
    assert gammas[0] > gammas[1] > gammas[2]
    assert gammas[2] < 0.6 * _mean_abs_gamma(fresh)
    assert all(result.test_accuracy > 0.85 for _, result in strength_runs)


def test_logged_cost_equals_analyze_on_the_exported_model(strength_runs):
    artifacts, result = strength_runs[2]
    proc = run("analyze", result.model_path, "--gamma-threshold", "0.05", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["effective"]["flops"] == pytest.approx(result.effective_cost, rel=1e-9)
    assert report["effective"]["flops"] < report["total"]["flops"]


def test_logs_structure_and_masks(strength_runs, tmp_path):
    artifacts, result = strength_runs[2]
    with open(artifacts.directory / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r["loss"]]
    assert len(steps) == result.steps == 10 * (len(load_dataset("digits").y_train) // 64)
    last = steps[-1]
    assert float(last["loss"]) == pytest.approx(float(last["task_loss"]) + float(last["strength"]) * float(last["regularization"]), rel=1e-4)
    assert float(steps[0]["effective_cost"]) == pytest.approx(artifacts.total_cost, rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(artifacts.directory / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("effective_cost")]
    assert len(logged) == result.steps
    assert logged[-1] == pytest.approx(float(last["effective_cost"]), rel=1e-6)
    assert {f"alive/group_{g}" for g in result.alive_per_group} <= set(events.Tags()["scalars"])

    structures = sorted((artifacts.directory / "learned_structure").glob("alive_*.json"))
    assert structures[0].name == "alive_00000.json" and len(structures) >= result.steps // 50
    final = json.loads(structures[-1].read_text())
    assert final == result.structure
    first = json.loads(structures[0].read_text())
    assert set(final) == set(first) and all(final[n] <= first[n] for n in final)
    assert sum(first.values()) > sum(final.values())

    pruned = prune(result.model_path, Mask(artifacts.directory / "masks.json"))
    dead = [g for g in result.alive_per_group.values() if g == 0]
    assert pruned.after.flops >= result.effective_cost
    if not dead:
        assert pruned.after.flops == pytest.approx(result.effective_cost, rel=1e-9)
    trained = build_channel_graph(load_model(result.model_path))
    kept = by_mask_document(trained, artifacts.directory / "masks.json")
    assert pruned.after.flops == pytest.approx(sum(op.flops for op in op_costs(trained, kept)), rel=1e-9)
    assert all(kept[g.classes].any() for g in trained.groups)
    assert pruned.masked_deviation.max_abs < 1e-4


def test_regularize_and_train_commands(fresh, tmp_path):
    out = tmp_path / "art"
    proc = run("regularize", fresh, "-o", out, "--cost", "params", "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert "regularizer: gamma on params" in proc.stdout
    artifacts = load_artifacts(out)
    assert artifacts.batch_size == 32 and artifacts.regularizer.cost == "params"
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "base_model.onnx"):
        assert (out / name).exists()
    assert onnx.load(str(out / "training_model.onnx")).ir_version <= 10

    proc = run("train", out, "--data", "digits", "--epochs", "1", "--limit", "256", "--structure-every", "2")
    assert proc.returncode == 0, proc.stderr
    assert "8 steps" in proc.stdout and "test accuracy" in proc.stdout
    assert "epoch 1/1" in proc.stderr
    assert (out / "trained.onnx").exists()
    assert len(list((out / "learned_structure").glob("*.json"))) == 5

    again = run("regularize", fresh, "-o", out)
    assert_user_error(again, "not empty", "--force")
    assert (out / "trained.onnx").exists()
    assert run("regularize", fresh, "-o", out, "--force").returncode == 0
    assert not (out / "trained.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_inputs_are_clear_errors(fresh, tmp_path):
    out = tmp_path / "art"
    assert_user_error(run("regularize", fresh, "-o", out, "--cost", "bogus"), "unknown cost 'bogus'")
    assert_user_error(run("regularize", fresh, "-o", out, "--cost", "latency"), "needs hardware")
    assert_user_error(run("regularize", fresh, "-o", out, "--strength", "-1"), "strength", ">= 0")
    assert_user_error(run("regularize", fresh, "-o", out, "--blacklist", "nothing.*"), "blacklist", "matches no node")
    assert not out.exists()

    no_bn = export(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)), (1, 1, 8, 8),
                   tmp_path / "no_bn.onnx")
    assert_user_error(run("regularize", no_bn, "-o", out), "no BatchNormalization scale", "group-lasso")
    assert run("regularize", no_bn, "-o", out, "--regularizer", "group-lasso").returncode == 0

    hard = export(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Hardswish(), nn.Flatten(),
                                nn.Linear(144, 10)), (1, 1, 8, 8), tmp_path / "hardswish.onnx")
    line = assert_user_error(run("regularize", hard, "-o", tmp_path / "h"), "HardSwish", "no gradient", "SiLU")
    assert "/2/HardSwish" in line
    assert not (tmp_path / "h").exists()

    assert_user_error(run("train", tmp_path / "missing", "--data", "digits"), "not an onnx-morph training directory")
    assert_user_error(run("train", out, "--data", "imagenet"), "unknown data 'imagenet'")
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((3, 8, 8)))
    assert_user_error(run("train", out, "--data", tmp_path / "bad.npz"), "needs arrays", "y_train")


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    import onnx_morph.data as data
    from onnx_morph.errors import OptionError

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    monkeypatch.setenv("ONNX_MORPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNX_MORPH_FASHION_MNIST_URL", "http://127.0.0.1:9/")  # nothing listens: no download
    monkeypatch.delenv("ONNX_MORPH_FASHION_MNIST", raising=False)
    with pytest.raises(OptionError, match="apt install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist")


def test_other_losses_train(fresh, tmp_path, digits):
    """MSE on one-hot targets, and a user's onnxblock loss, both lower their loss on digits."""
    from onnxruntime.training import onnxblock

    x, y = digits.x_train[:512], digits.y_train[:512]
    one_hot = np.eye(10, dtype=np.float32)[y]

    class L1(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self.l1 = onnxblock.loss.L1Loss()

        def build(self, output):
            return self.l1(output, "labels")

    for name, loss in (("mse", "mse"), ("custom", L1())):
        artifacts = make_training_artifacts(fresh, tmp_path / name, loss=loss)
        assert artifacts.labels == ("target" if name == "mse" else "labels")
        result = train(artifacts, [(xb, tb) for xb, tb in zip(np.split(x, 8), np.split(one_hot, 8))] * 1,
                       epochs=3, learning_rate=0.01, progress=None, structure_every=0)
        losses = [r["task_loss"] for r in result.history]
        assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), (name, losses)


def test_killed_regularize_leaves_nothing(fresh, tmp_path):
    import signal
    import time

    before = fresh.read_bytes()
    out = tmp_path / "art"
    for delay in (0.8, 1.6):
        proc = subprocess.Popen([str(SCRIPT), "regularize", str(fresh), "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists() or (out / "morph.json").exists()
    assert run("regularize", fresh, "-o", out, "--force").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert fresh.read_bytes() == before
