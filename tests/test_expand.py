"""`expand`, MorphNet's expansion step, on real exports: the written model meets the budget with
the FLOPs the cost model predicted, tied channels stay consistent (onnxruntime runs it), widths
follow one multiplier, weights are fresh, and the result trains from scratch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tools import zoo

from cli_checks import assert_user_error
from onnx_morph.analysis import analyze
from onnx_morph.costs import total_cost
from onnx_morph.data import load_dataset
from onnx_morph.errors import OptionError
from onnx_morph.examples import export, small_resnet
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.rewrite import Budget, prune, save_model
from onnx_morph.rewrite.training.artifacts import make_training_artifacts
from onnx_morph.rewrite.surgery.expand import expand, expand_file, width_copies
from onnx_morph.train import train

SCRIPT = Path(sys.executable).parent / "onnx-morph"
MODELS = ["BasicBlock", "Bottleneck", "InvertedResidual", "ResNeXtBlock", "DenseBlock", "InceptionBlock",
          "SplitBlock", "ShuffleUnit", "FlattenHead", "TransformerBlock", "ConvTransposeNet"]


class Exports:
    def __init__(self, folder: Path):
        self.folder, self.paths = folder, {}

    def __call__(self, name: str) -> Path:
        if name not in self.paths:
            factory, shape = zoo.ZOO[name]
            self.paths[name] = zoo.export_onnx(factory(), shape, self.folder / f"{name}.onnx")
        return self.paths[name]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("expand_exports"))


def outputs(model, shape: tuple[int, ...]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model),
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return session.run(None, feed)


@pytest.mark.parametrize("factor", [0.6, 1.7])
@pytest.mark.parametrize("name", MODELS)
def test_expanded_model_meets_the_budget_it_predicted(name, factor, exported, tmp_path):
    path = exported(name)
    before = analyze(path).total.flops
    result = expand(path, target_flops=factor * before)
    written = tmp_path / "expanded.onnx"
    onnx.save(result.model, written)
    measured = analyze(written).total.flops
    assert measured == result.predicted == result.after.flops
    assert measured <= factor * before
    graph = build_channel_graph(load_model(path))
    assert total_cost(graph, width_copies(graph, result.multiplier + 1e-6), "flops") > factor * before  # tight
    assert (result.multiplier > 1) == (factor > 1)
    shape = zoo.ZOO[name][1]
    assert [o.shape for o in outputs(written, shape)] == [o.shape for o in outputs(path, shape)]


def test_every_prunable_group_follows_one_multiplier(exported):
    graph = build_channel_graph(load_model(exported("InvertedResidual")))
    for round_to in (1, 4):
        copies = width_copies(graph, 1.37, round_to)
        for group in graph.groups:
            width = int(copies[group.classes].sum())
            if group.prunable:
                assert width == max(round_to, round(1.37 * group.size / round_to) * round_to)
                assert copies[group.classes].max() - copies[group.classes].min() <= 1
            else:
                assert width == group.size


def test_round_to_gives_multiples(exported):
    path = exported("Bottleneck")
    result = expand(path, target_flops=2 * analyze(path).total.flops, round_to=4)
    changed = [w for w in result.widths if w.after != w.before]
    assert changed and all(w.after % 4 == 0 for w in changed)


def test_weights_are_fresh_and_seeded(exported):
    path = exported("BasicBlock")
    target = 1.5 * analyze(path).total.flops
    first, again, other = (expand(path, target_flops=target, seed=s).model for s in (0, 0, 1))
    values = {t.name: numpy_helper.to_array(t) for t in first.graph.initializer}
    by_op = {}
    for node in first.graph.node:
        by_op.setdefault(node.op_type, []).append(node)
    for bn in by_op["BatchNormalization"]:
        scale, bias, mean, var = (values[n] for n in bn.input[1:5])
        assert (scale == 1).all() and (bias == 0).all() and (mean == 0).all() and (var == 1).all()
    for conv in by_op["Conv"]:
        w = values[conv.input[1]]
        bound = 1 / np.sqrt(np.prod(w.shape[1:]))
        assert np.abs(w).max() <= bound
        assert w.std() > 0.4 * bound  # uniform in +-bound has std bound / sqrt(3)
    assert all(a == b for a, b in zip(first.graph.initializer, again.graph.initializer))
    assert any(a != b for a, b in zip(first.graph.initializer, other.graph.initializer))


def test_a_pruned_structure_grows_back_to_the_seed_budget(tmp_path):
    """MorphNet's shrink then expand: the learned proportions are kept, up to rounding."""
    path = export(small_resnet(width=16), (1, 1, 28, 28), tmp_path / "seed.onnx")
    seed_flops = analyze(path).total.flops
    pruned = prune(path, Budget(ratio=0.4))
    pruned_path = tmp_path / "pruned.onnx"
    onnx.save(pruned.model, pruned_path)
    result = expand(pruned_path, target_flops=seed_flops)
    assert 0.9 * seed_flops <= result.after.flops <= seed_flops
    multiplier = result.multiplier
    prunable = {w.node for w in pruned.widths if w.after != w.before}
    for width in result.widths:
        if width.node in prunable:
            assert abs(width.after - multiplier * width.before) <= 1


def test_expanded_model_trains_from_scratch(tmp_path):
    digits = load_dataset("digits")
    path = export(small_resnet(width=4), (1, 1, 8, 8), tmp_path / "small.onnx")
    result = expand(path, target_flops=3 * analyze(path).total.flops)
    onnx.save(result.model, tmp_path / "expanded.onnx")
    artifacts = make_training_artifacts(tmp_path / "expanded.onnx", tmp_path / "artifacts", regularizer=None)
    trained = train(artifacts, (digits.x_train, digits.y_train), epochs=3, learning_rate=0.01, export=tmp_path / "t.onnx",
                    test_data=(digits.x_test, digits.y_test), progress=None)
    assert trained.test_accuracy > 0.8


def test_library_errors(exported, tmp_path):
    path = exported("BasicBlock")
    flops = analyze(path).total.flops
    cases = [
        (dict(), "exactly one"),
        (dict(target_flops=flops, target_params=1e6), "exactly one"),
        (dict(target_flops=-1.0), "must be positive"),
        (dict(target_flops=flops, round_to=0), "round_to must be at least 1"),
        (dict(target_flops=1e3), "below"),
        (dict(target_flops=1e15), "out of reach"),
    ]
    for options, fragment in cases:
        with pytest.raises(OptionError, match=fragment):
            expand(path, **options)
    with pytest.raises(OptionError, match="no channel group can change width"):
        expand(exported("UnknownOpNet"), target_flops=1e9)


def test_cli_writes_the_model_and_refuses_bad_input(exported, tmp_path):
    path = exported("DenseBlock")
    flops = analyze(path).total.flops
    out = tmp_path / "out.onnx"
    proc = subprocess.run([str(SCRIPT), "expand", str(path), "-o", str(out), "--target-flops", str(1.5 * flops),
                           "--round-to", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "width multiplier" in proc.stdout and "fresh weights" in proc.stdout
    assert analyze(out).total.flops <= 1.5 * flops
    digest = path.read_bytes()
    for args, fragment in [(["--target-flops", "10"], "below"), (["--target-params", "0"], "positive")]:
        target = tmp_path / "never.onnx"
        proc = subprocess.run([str(SCRIPT), "expand", str(path), "-o", str(target), *args],
                              capture_output=True, text=True, timeout=300)
        assert_user_error(proc, fragment)
        assert not target.exists()
    proc = subprocess.run([str(SCRIPT), "expand", str(path), "-o", str(path), "--target-flops", str(flops)],
                          capture_output=True, text=True, timeout=300)
    assert_user_error(proc)
    assert path.read_bytes() == digest
    with pytest.raises(OptionError):
        expand_file(path, path, target_flops=flops)


def test_cli_like_targets_another_models_flops(exported, tmp_path):
    """Shrink by pruning half the FLOPs, then grow back to the original's FLOPs with --like."""
    path = exported("DenseBlock")
    pruned = tmp_path / "pruned.onnx"
    save_model(prune(path, Budget(ratio=0.5), verify=False).model, pruned)
    out = tmp_path / "wide.onnx"
    proc = subprocess.run([str(SCRIPT), "expand", str(pruned), "-o", str(out), "--like", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    original, grown = analyze(path).total.flops, analyze(out).total.flops
    assert 0.9 * original <= grown <= original
    assert grown == expand(pruned, target_flops=original).after.flops
    missing = tmp_path / "missing.onnx"
    proc = subprocess.run([str(SCRIPT), "expand", str(pruned), "-o", str(tmp_path / "never.onnx"), "--like", str(missing)],
                          capture_output=True, text=True, timeout=300)
    assert_user_error(proc, str(missing), "no such file")
    assert not (tmp_path / "never.onnx").exists()
