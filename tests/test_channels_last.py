"""Channels-last exports as tf2onnx writes them (issue 17, item 6).

Keras models reach ONNX with an NHWC graph input, a Transpose (perm 0,3,1,2) to NCHW ahead of each
Conv (or one for the whole conv stack) and back (perm 0,2,3,1) after it, BatchNormalization folded
into the conv weights and biases (so the weight slices are the only regularization source, group
lasso / --weight-threshold), and a head of ReduceMean over H, W (or GlobalAveragePool before the
transpose back, then Squeeze) and MatMul + Add or Gemm. Graphs are built here with onnx.helper in that layout.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_morph
from onnx_morph.rewrite import Mask, Threshold, prune
from onnx_morph.rewrite.surgery.select import mask_document

DEAD = {"w1": [1, 4], "w2": [0, 5], "w3": [3]}


def _weights(rng: np.random.Generator) -> list[onnx.TensorProto]:
    shapes = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (12, 8, 3, 3), "b2": (12,), "w3": (12, 12, 1, 1), "b3": (12,),
              "scale": (12,), "wfc": (12, 5), "bfc": (5,)}
    values = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in shapes.items()}
    for name, dead in DEAD.items():  # channels that group lasso drove to zero
        values[name][dead] = 0
    values["axes"] = np.array([1, 2], dtype=np.int64)
    return [numpy_helper.from_array(v, name) for name, v in values.items()]


def _nodes(per_conv: bool, head: str) -> list[onnx.NodeProto]:
    """conv1 (padded) -> Relu -> conv2 (unpadded) -> Relu -> residual: + Relu(conv3 1x1) -> a per-channel
    Mul in NHWC (a Keras scale) -> pooled head. `per_conv`: tf2onnx's transposes around every Conv,
    the activations NHWC between them; otherwise one Transpose in and one out. `head`: ReduceMean over
    H, W then MatMul + Add ("matmul") or Gemm ("gemm"), or GlobalAveragePool, Transpose, Squeeze, MatMul
    + Add ("gap")."""
    t = helper.make_node
    if per_conv:
        body = [
            t("Transpose", ["input_1"], ["x0"], perm=[0, 3, 1, 2], name="conv1__6"),
            t("Conv", ["x0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="model/conv1/Conv2D"),
            t("Transpose", ["c1"], ["c1_nhwc"], perm=[0, 2, 3, 1], name="conv1__8"),
            t("Relu", ["c1_nhwc"], ["r1"], name="model/conv1/Relu"),
            t("Transpose", ["r1"], ["x1"], perm=[0, 3, 1, 2], name="conv2__10"),
            t("Conv", ["x1", "w2", "b2"], ["c2"], name="model/conv2/Conv2D"),
            t("Transpose", ["c2"], ["c2_nhwc"], perm=[0, 2, 3, 1], name="conv2__12"),
            t("Relu", ["c2_nhwc"], ["r2"], name="model/conv2/Relu"),
            t("Transpose", ["r2"], ["x2"], perm=[0, 3, 1, 2], name="conv3__14"),
            t("Conv", ["x2", "w3", "b3"], ["c3"], name="model/conv3/Conv2D"),
            t("Transpose", ["c3"], ["c3_nhwc"], perm=[0, 2, 3, 1], name="conv3__16"),
            t("Relu", ["c3_nhwc"], ["r3"], name="model/conv3/Relu"),
            t("Add", ["r2", "r3"], ["sum"], name="model/add/add"),
            t("Mul", ["sum", "scale"], ["scaled"], name="model/scale/mul"),
        ]
        pooled = [t("ReduceMean", ["scaled", "axes"], ["gap"], keepdims=0, name="model/gap/Mean")]
    else:
        body = [
            t("Transpose", ["input_1"], ["x0"], perm=[0, 3, 1, 2], name="conv1__6"),
            t("Conv", ["x0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="model/conv1/Conv2D"),
            t("Relu", ["c1"], ["r1"], name="model/conv1/Relu"),
            t("Conv", ["r1", "w2", "b2"], ["c2"], name="model/conv2/Conv2D"),
            t("Relu", ["c2"], ["r2"], name="model/conv2/Relu"),
            t("Conv", ["r2", "w3", "b3"], ["c3"], name="model/conv3/Conv2D"),
            t("Relu", ["c3"], ["r3"], name="model/conv3/Relu"),
            t("Add", ["r2", "r3"], ["sum"], name="model/add/add"),
            t("Transpose", ["sum"], ["sum_nhwc"], perm=[0, 2, 3, 1], name="add__20"),
            t("Mul", ["sum_nhwc", "scale"], ["scaled"], name="model/scale/mul"),
        ]
        pooled = [t("ReduceMean", ["scaled", "axes"], ["gap"], keepdims=0, name="model/gap/Mean")]
    if head == "gap":  # GlobalAveragePool in NCHW, then back to NHWC [N, 1, 1, C] and squeezed
        body = [n for n in body if n.op_type != "Mul" and n.name != "add__20"]
        pooled = [t("GlobalAveragePool", ["sum"], ["pool"], name="model/gap/Mean"),
                  t("Transpose", ["pool"], ["pool_nhwc"], perm=[0, 2, 3, 1], name="gap__22"),
                  t("Mul", ["pool_nhwc", "scale"], ["scaled"], name="model/scale/mul"),
                  t("Squeeze", ["scaled", "axes"], ["gap"], name="model/gap/Squeeze")]
        head = "matmul"
    if head == "gemm":
        return body + pooled + [t("Gemm", ["gap", "wfc", "bfc"], ["out"], name="model/dense/MatMul")]
    return body + pooled + [t("MatMul", ["gap", "wfc"], ["mm"], name="model/dense/MatMul"),
                            t("Add", ["mm", "bfc"], ["out"], name="model/dense/BiasAdd")]


def _model(tmp_path, per_conv: bool, head: str) -> str:
    graph = helper.make_graph(
        _nodes(per_conv, head), "tf2onnx",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__1", 8, 8, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["unk__2", 5])],
        _weights(np.random.default_rng(0)))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tf2onnx")
    onnx.checker.check_model(model, full_check=True)
    path = str(tmp_path / f"keras_{int(per_conv)}_{head}.onnx")
    onnx.save(model, path)
    return path


LAYOUTS = [(True, "matmul"), (True, "gemm"), (False, "matmul"), (False, "gemm"), (False, "gap")]


@pytest.mark.parametrize(("per_conv", "head"), LAYOUTS)
def test_channels_last_analyze_finds_conv_groups(tmp_path, per_conv, head):
    analysis = onnx_morph.analyze(_model(tmp_path, per_conv, head), weight_threshold=1e-6)
    groups = [(g.size, g.prunable, g.pin_reasons, sorted(s.split(":")[1] for s in g.sources)) for g in analysis.groups]
    assert groups == [
        (3, False, ["graph input 'input_1'"], []),  # the NHWC input's channels are its last axis
        (8, True, [], ["w1"]),
        (12, True, [], ["w2", "w3"]),  # the residual stream, NHWC and NCHW tensors alike
        (5, False, ["graph output 'out'"], ["wfc"]),
    ]
    assert analysis.input_shapes == {"input_1": (1, 8, 8, 3)}
    # conv1 8x8 (padded), conv2 6x6, conv3 6x6, dense 12x5; FLOPs 2 per MAC
    assert analysis.total.flops == 2 * (64 * 27 * 8 + 36 * 72 * 12 + 36 * 12 * 12 + 12 * 5)
    # w1's 2 zero slices kill 2 channels; on the residual stream w2 and w3 zero different channels
    dead = [int((~analysis.alive[np.asarray(g.classes)]).sum()) for g in analysis.graph.groups]
    assert dead == [0, 2, 0, 0]  # a stream channel dies only when both its producers' slices are zero


@pytest.mark.parametrize(("per_conv", "head"), LAYOUTS)
def test_channels_last_prune_equals_masked_original(tmp_path, per_conv, head):
    path = _model(tmp_path, per_conv, head)
    analysis = onnx_morph.analyze(path)
    alive = np.ones(analysis.graph.num_classes, dtype=bool)
    for group in analysis.graph.groups:
        if group.prunable:
            alive[np.asarray(group.classes)[[1, 4] if group.size == 8 else [0, 3, 5]]] = False
    result = prune(path, Mask(mask_document(analysis.graph, alive)))
    assert [(w.before, w.after) for w in result.widths] == [(8, 6), (12, 9), (12, 9), (5, 5)]
    assert result.masked_deviation.max_rel <= 1e-5
    shapes = {t.name.split("::")[0]: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w2"] == [9, 6, 3, 3] and shapes["w3"] == [9, 9, 1, 1]
    assert shapes["scale"] == [9] and shapes["wfc"] == [9, 5]  # the NHWC per-channel constant follows
    assert onnx_morph.analyze(result.model).total.flops == result.after.flops


def test_channels_last_weight_threshold_prunes_folded_batchnorm_convs(tmp_path):
    """BatchNorm folded into the convs: the weight slices decide, and conv1's dead channels (their
    constant relu(bias)) fold exactly into the unpadded conv2's bias."""
    path = _model(tmp_path, False, "gemm")
    result = prune(path, Threshold(weight=1e-6))
    assert [(w.before, w.after) for w in result.widths] == [(8, 6), (12, 12), (12, 12), (5, 5)]
    assert result.masked_deviation.max_rel <= 1e-5
    assert result.original_deviation.max_rel <= 1e-5
