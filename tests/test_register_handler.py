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
