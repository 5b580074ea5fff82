"""Users teach onnx-morph their own ops: `register_handler` for a custom-domain activation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_morph
from onnx_morph.handlers import BaseHandler, Passthrough, register_handler
from onnx_morph.rewrite import Mask, prune


def _model(path) -> None:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("ScaledRelu", ["c1"], ["r"], name="act", domain="com.example", alpha=2.0),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]),
              str(path))


@pytest.fixture
def scaled_relu():
    previous = register_handler("ScaledRelu", Passthrough(), domain="com.example")
    yield
    register_handler("ScaledRelu", previous, domain="com.example")


def test_unknown_custom_op_pins_its_channels(tmp_path):
    _model(tmp_path / "m.onnx")
    groups = onnx_morph.analyze(tmp_path / "m.onnx").groups
    assert [g.pin_reasons for g in groups if g.size == 8] == [["unknown op com.example.ScaledRelu at node 'act'"]]


def test_registered_custom_op_prunes_through(tmp_path, scaled_relu):
    _model(tmp_path / "m.onnx")
    result = onnx_morph.analyze(tmp_path / "m.onnx")
    assert [(g.size, g.prunable) for g in result.groups] == [(3, False), (8, True), (4, False)]
    keep = [1, 0, 1, 0, 1, 1, 0, 1]
    small = prune(tmp_path / "m.onnx", Mask({"format": "onnx-morph-masks", "masks": {"c1": keep}}), verify=False,
                  fold_constants=False)  # onnxruntime has no kernel for the custom op: nothing can run it
    weights = {t.name: numpy_helper.to_array(t) for t in small.model.graph.initializer}
    w1 = next(v for k, v in weights.items() if k.startswith("w1"))
    w2 = next(v for k, v in weights.items() if k.startswith("w2"))
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    kept = np.flatnonzero(keep)
    np.testing.assert_array_equal(w1, original["w1"][kept])
    np.testing.assert_array_equal(w2, original["w2"][:, kept])
    assert small.after.flops == pytest.approx(small.before.flops * 5 / 8, rel=0.01)


def test_a_handler_is_a_base_handler():
    with pytest.raises(TypeError, match="subclasses onnx_morph.handlers.BaseHandler"):
        register_handler("ScaledRelu", object(), domain="com.example")
    assert isinstance(Passthrough(), BaseHandler)


class ScaledRelu(Passthrough):
    """alpha * relu(x): onnxruntime-training has neither a kernel nor a gradient for the custom op, so
    the training graph computes it from standard ops (the to_training hook)."""

    def to_training(self, node, fresh):
        alpha = next(a.f for a in node.attribute if a.name == "alpha")
        relu, scale = fresh(f"{node.name}/relu"), fresh(f"{node.name}/alpha")
        return [helper.make_node("Relu", [node.input[0]], [relu], name=relu),
                helper.make_node("Constant", [], [scale], name=scale, value=numpy_helper.from_array(np.array(alpha, np.float32))),
                helper.make_node("Mul", [relu, scale], list(node.output), name=f"{node.name}/scaled")]


def _classifier(path, alpha: float = 2.0):
    """x [N, 3, 2, 2] -> 1x1 Conv -> BatchNorm -> ScaledRelu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((8, 3, 1, 1)), "gamma": rng.uniform(0.5, 1.5, 8), "beta": rng.uniform(-0.2, 0.2, 8),
              "mean": np.zeros(8), "var": np.ones(8), "fc": rng.standard_normal((10, 8)), "fc_b": np.zeros(10)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
             helper.make_node("ScaledRelu", ["b"], ["r"], name="act", domain="com.example", alpha=alpha),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]),
              str(path))
    return params


def _cross_entropy(params, x, labels, alpha: float) -> float:
    """The classifier's loss in training mode (BatchNorm normalizes by the batch's statistics)."""
    h = np.einsum("oc,nchw->nohw", params["w"][:, :, 0, 0], x.astype(np.float64))
    mean, var = h.mean(axis=(0, 2, 3), keepdims=True), h.var(axis=(0, 2, 3), keepdims=True)
    b = (h - mean) / np.sqrt(var + 1e-5) * params["gamma"][:, None, None] + params["beta"][:, None, None]
    logits = (alpha * np.maximum(b, 0)).mean(axis=(2, 3)) @ params["fc"].T + params["fc_b"]
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def test_custom_op_trains_through_its_to_training_hook(tmp_path):
    pytest.importorskip("onnxruntime.training")
    from onnx_morph.rewrite.training.artifacts import make_training_artifacts
    from onnx_morph.train import train

    params = _classifier(tmp_path / "m.onnx", alpha=2.0)
    previous = register_handler("ScaledRelu", ScaledRelu(), domain="com.example")
    try:
        artifacts = make_training_artifacts(tmp_path / "m.onnx", tmp_path / "art", batch_size=4)
        rng = np.random.default_rng(2)
        x, y = rng.standard_normal((4, 3, 2, 2)).astype(np.float32), rng.integers(0, 10, 4)
        result = train(artifacts, (x, y), strength=0.0, progress=None)
    finally:
        register_handler("ScaledRelu", previous, domain="com.example")
    training = onnx.load(str(artifacts.training_model))
    ops = {n.op_type for n in training.graph.node}
    assert "ScaledRelu" not in ops and {"act/relu", "act/scaled"} <= {n.name.removeprefix("morph/") for n in training.graph.node}
    assert artifacts.initial_regularization > 0  # the BatchNorm scale regularizes the custom op's channels
    # One real step of onnxruntime-training: its loss is the one of 2 * relu in training mode.
    assert result.steps == 1
    assert result.task_loss == pytest.approx(_cross_entropy(params, x, y, 2.0), rel=1e-4)
    assert result.task_loss != pytest.approx(_cross_entropy(params, x, y, 1.0), rel=1e-3)


def test_custom_op_declared_without_gradient_is_refused(tmp_path):
    pytest.importorskip("onnxruntime.training")
    from onnx_morph.errors import OptionError
    from onnx_morph.handlers import without_gradient
    from onnx_morph.rewrite.training.artifacts import make_training_artifacts

    _classifier(tmp_path / "m.onnx")
    previous = register_handler("ScaledRelu", without_gradient(Passthrough(), "use nn.ReLU"), domain="com.example")
    try:
        with pytest.raises(OptionError, match=r"node 'act' \(ScaledRelu\) has no gradient .*: use nn.ReLU before exporting"):
            make_training_artifacts(tmp_path / "m.onnx", tmp_path / "art")
        # Analysis and pruning still treat it as the Passthrough it is.
        assert [(g.size, g.prunable) for g in onnx_morph.analyze(tmp_path / "m.onnx").groups][:2] == [(3, False), (8, True)]
    finally:
        register_handler("ScaledRelu", previous, domain="com.example")
    assert not (tmp_path / "art").exists()
