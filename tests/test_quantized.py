"""Quantized graphs (issue 17, item 5).

QDQ models as onnxruntime's quantize_static writes them (QuantFormat.QDQ, per-tensor and
per-channel weight scales) from a small CNN exported from torch (random init, a residual add, a
Linear head): `analyze` sees through DequantizeLinear(int8 weight) and counts memory at the stored
precision; `prune` slices the int8 weights with their per-channel scales and zero points, and the
pruned model equals the zero-masked original in onnxruntime.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import onnx_morph
from onnx_morph.rewrite import Mask, Threshold, prune
from onnx_morph.rewrite.surgery.select import mask_document

quantization = pytest.importorskip("onnxruntime.quantization")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.c3 = nn.Conv2d(12, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = x + torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


class _Reader(quantization.CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.batches = iter([{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def _float_model(path, dead: bool) -> str:
    torch.manual_seed(0)
    module = SmallCNN().eval()
    if dead:  # channels a group-lasso training drove to zero
        with torch.no_grad():
            module.c1.weight[[1, 4]] = 0
            module.c2.weight[[0, 5, 7]] = 0
            module.c3.weight[[0, 5, 7]] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.randn(1, 3, 8, 8), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return str(path)


def _qdq_model(tmp_path, per_channel: bool, dead: bool = False) -> tuple[str, str]:
    source = _float_model(tmp_path / "float.onnx", dead)
    target = str(tmp_path / f"qdq_{int(per_channel)}.onnx")
    quantization.quantize_static(source, target, _Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=per_channel, weight_type=quantization.QuantType.QInt8)
    return source, target


def _initializer_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name.split("::")[0]: list(t.dims) for t in model.graph.initializer}


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_analyze_sees_through_dequantized_weights(tmp_path, per_channel):
    source, path = _qdq_model(tmp_path, per_channel)
    plain, quantized = onnx_morph.analyze(source), onnx_morph.analyze(path)
    groups = [(g.size, g.prunable, len(g.sources)) for g in quantized.groups]
    # input (pinned), c1's 8, the residual stream of c2 and c3 (12, two weight sources), the logits (pinned)
    assert groups == [(3, False, 0), (8, True, 1), (12, True, 2), (5, False, 1)]
    assert not quantized.unknown_ops
    assert quantized.total.flops == plain.total.flops == 156792
    assert onnx_morph.analyze(path, macs=True).total.flops == 156792 / 2
    assert quantized.total.params == plain.total.params == 1321  # int8 weights and int32 biases count
    # every activation, weight and bias bytes at 1 byte (uint8 activations, int8 weights) in place of 4
    assert quantized.total.memory_bytes == plain.total.memory_bytes / 4 == 4821
    c1 = next(op for op in quantized.ops if op.node == "/c1/Conv")
    assert c1.memory_bytes == 3 * 64 + 8 * 64 + 8 * 3 * 9


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_prune_shrinks_int8_weights_and_per_channel_scales(tmp_path, per_channel):
    _, path = _qdq_model(tmp_path, per_channel, dead=True)
    analysis = onnx_morph.analyze(path, weight_threshold=1e-6)
    assert analysis.effective.flops < analysis.total.flops
    result = prune(path, Threshold(weight=1e-6))
    assert [(w.node, w.before, w.after) for w in result.widths] == [
        ("/c1/Conv", 8, 6), ("/c2/Conv", 12, 9), ("/c3/Conv", 12, 9), ("/fc/Gemm", 5, 5)]
    assert result.masked_deviation.max_abs <= 1e-6
    assert result.original_deviation.max_rel <= 1e-5  # the removed channels were constant, and folded
    shapes = _initializer_shapes(result.model)
    assert shapes["c1.weight_quantized"] == [6, 3, 3, 3]
    assert shapes["c2.weight_quantized"] == [9, 6, 3, 3]
    assert shapes["fc.weight_quantized"] == [5, 9]
    weights = {t.name: t for t in result.model.graph.initializer}
    assert weights["c2.weight_quantized::pruned"].data_type == onnx.TensorProto.INT8
    # the removed channels' constants went into c3's and fc's int32 biases: every Conv and Gemm still
    # reads its weight and bias through DequantizeLinear, as the runtime's quantized kernels need
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    for node in result.model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert [producers.get(i) for i in node.input] == ["DequantizeLinear"] * 3
    assert all(t.data_type == onnx.TensorProto.INT32 for name, t in weights.items() if "bias_quantized::" in name)
    if per_channel:
        assert shapes["c1.weight_scale"] == shapes["c1.weight_zero_point"] == [6]
        assert shapes["c2.weight_scale"] == [9] and shapes["c2.bias_quantized_scale"] == [9]
        assert shapes["fc.weight_scale"] == [5]  # the logits stay
    else:
        assert all(shapes[name] in ([], [1]) for name in shapes if name.endswith(("_scale", "_zero_point")))
    pruned = onnx_morph.analyze(result.model)
    assert pruned.total.flops == result.after.flops
    assert pruned.total.memory_bytes == analysis.effective.memory_bytes


def test_qdq_large_weights_stay_int8(tmp_path, monkeypatch):
    """Weights over the size up to which other constants' layouts are followed (an LLM's) are still
    sliced at their int8 initializers, not written out dequantized."""
    import onnx_morph.graph.channel_graph as channel_graph

    monkeypatch.setattr(channel_graph, "_MAX_VIEW_ELEMENTS", 16)
    _, path = _qdq_model(tmp_path, per_channel=True, dead=True)
    result = prune(path, Threshold(weight=1e-6))
    assert result.masked_deviation.max_abs <= 1e-6
    assert not [t.name for t in result.model.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]  # no float weight appeared
    assert _initializer_shapes(result.model)["c2.weight_quantized"] == [9, 6, 3, 3]


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_random_masks_equal_the_masked_original(tmp_path, per_channel):
    """Channels that are not dead: the pruned model equals the original with them zeroed."""
    _, path = _qdq_model(tmp_path, per_channel)
    analysis = onnx_morph.analyze(path)
    alive = np.ones(analysis.graph.num_classes, dtype=bool)
    for group in analysis.graph.groups:
        if group.prunable:
            alive[np.asarray(group.classes)[[0, 2, 3]]] = False
    result = prune(path, Mask(mask_document(analysis.graph, alive)))
    assert result.removed_channels == 6
    assert result.masked_deviation.max_abs <= 1e-5
    assert [w.after for w in result.widths] == [5, 9, 9, 5]


def _qoperator_model(tmp_path, per_channel: bool) -> str:
    source = _float_model(tmp_path / "float.onnx", dead=False)
    target = str(tmp_path / f"qop_{int(per_channel)}.onnx")
    quantization.quantize_static(source, target, _Reader(), quant_format=quantization.QuantFormat.QOperator,
                                 per_channel=per_channel, weight_type=quantization.QuantType.QInt8)
    return target


@pytest.mark.parametrize("per_channel", [False, True])
def test_qoperator_model_analyzes_and_prunes_like_qdq(tmp_path, per_channel):
    """quantize_static's QOperator form: QLinearConv, com.microsoft QLinearAdd and QGemm."""
    path = _qoperator_model(tmp_path, per_channel)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"QLinearConv", "QLinearAdd", "QGemm"} <= ops
    _, qdq = _qdq_model(tmp_path, per_channel)
    analysis, reference = onnx_morph.analyze(path), onnx_morph.analyze(qdq)
    assert not analysis.unknown_ops
    assert [(g.size, g.prunable) for g in analysis.groups] == [(3, False), (8, True), (12, True), (5, False)]
    assert (analysis.total.flops, analysis.total.params, analysis.total.memory_bytes) == (
        reference.total.flops, reference.total.params, reference.total.memory_bytes) == (156792, 1321, 4821)
    alive = np.ones(analysis.graph.num_classes, dtype=bool)
    for group in analysis.graph.groups:
        if group.prunable:
            alive[np.asarray(group.classes)[[0, 2]]] = False
    result = prune(path, Mask(mask_document(analysis.graph, alive)))
    assert [w.after for w in result.widths] == [6, 10, 10, 5]
    assert result.masked_deviation.max_abs == 0  # removed uint8 channels held at their zero point
    shapes = _initializer_shapes(result.model)
    assert shapes["c2.weight_quantized"] == [10, 6, 3, 3] and shapes["c2.bias_quantized"] == [10]
    assert shapes["fc.weight_quantized"] == [5, 10]
    if per_channel:
        assert shapes["c2.weight_scale"] == shapes["c2.weight_zero_point"] == [10]
    assert onnx_morph.analyze(result.model).total.flops == result.after.flops


def _integer_ops_model(path) -> str:
    """Quantize -> ConvInteger (uint8, per-tensor zero points, as onnxruntime runs it) -> Cast -> per-channel
    Mul and Add -> Relu -> Quantize -> QLinearConv (per-channel w scales, int32 bias) -> Dequantize ->
    ReduceMean -> Quantize -> QLinearMatMul (per-column b scales) -> MatMulInteger (per-column b zero point)."""
    rng = np.random.default_rng(0)

    def i8(shape):
        return rng.integers(-60, 60, size=shape).astype(np.int8)

    values = {
        "xs": np.float32(0.02), "xz": np.uint8(128),
        "w1": rng.integers(0, 255, (8, 3, 3, 3)).astype(np.uint8), "w1z": np.uint8(125),
        "s1": (rng.random((1, 8, 1, 1)) * 1e-3 + 1e-4).astype(np.float32),
        "b1": (rng.standard_normal((1, 8, 1, 1)) * 0.1).astype(np.float32),
        "s2": np.float32(0.05), "z2": np.uint8(10),
        "w2": i8((12, 8, 3, 3)), "w2s": (rng.random(12) * 0.01 + 0.001).astype(np.float32), "w2z": np.zeros(12, np.int8),
        "ys": np.float32(0.1), "yz": np.uint8(100), "B2": rng.integers(-500, 500, 12).astype(np.int32),
        "sa": np.float32(0.05), "za": np.uint8(120),
        "wb": i8((12, 6)), "sb": (rng.random(6) * 0.01 + 0.001).astype(np.float32), "zb": np.zeros(6, np.int8),
        "sy": np.float32(0.2), "zy": np.uint8(128),
        "wc": i8((6, 5)), "wcz": rng.integers(-3, 3, 5).astype(np.int8),
    }
    make = onnx.helper.make_node
    nodes = [
        make("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quant_x"),
        make("ConvInteger", ["xq", "w1", "xz", "w1z"], ["i1"], pads=[1, 1, 1, 1], name="conv1"),
        make("Cast", ["i1"], ["f1"], to=onnx.TensorProto.FLOAT, name="cast1"),
        make("Mul", ["f1", "s1"], ["m1"], name="scale1"),
        make("Add", ["m1", "b1"], ["a1"], name="bias1"),
        make("Relu", ["a1"], ["r1"], name="relu1"),
        make("QuantizeLinear", ["r1", "s2", "z2"], ["q1"], name="quant_r1"),
        make("QLinearConv", ["q1", "s2", "z2", "w2", "w2s", "w2z", "ys", "yz", "B2"], ["q2"], name="conv2"),
        make("DequantizeLinear", ["q2", "ys", "yz"], ["f2"], name="dq2"),
        make("ReduceMean", ["f2"], ["g"], axes=[2, 3], keepdims=0, name="gap"),
        make("QuantizeLinear", ["g", "sa", "za"], ["qg"], name="quant_g"),
        make("QLinearMatMul", ["qg", "sa", "za", "wb", "sb", "zb", "sy", "zy"], ["qm"], name="fc1"),
        make("MatMulInteger", ["qm", "wc", "zy", "wcz"], ["im"], name="fc2"),
        make("Cast", ["im"], ["out"], to=onnx.TensorProto.FLOAT, name="cast_out"),
    ]
    graph = onnx.helper.make_graph(
        nodes, "integer_ops", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in values.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def test_integer_ops_prune_with_their_scales_and_zero_points(tmp_path):
    path = _integer_ops_model(tmp_path / "integer_ops.onnx")
    analysis = onnx_morph.analyze(path)
    assert not analysis.unknown_ops
    assert [(g.size, g.prunable, g.sources) for g in analysis.groups] == [
        (3, False, []),
        (8, True, []),  # uint8 weights with zero point 125: their slices' norms say nothing
        (12, True, ["weight:w2"]),
        (6, True, ["weight:wb"]),
        (5, False, []),  # wc's zero points are not 0 either
    ]
    flops = {op.node: op.flops for op in analysis.ops if op.flops}
    assert flops == {"conv1": 2 * 64 * 27 * 8, "conv2": 2 * 36 * 72 * 12, "fc1": 2 * 12 * 6, "fc2": 2 * 6 * 5}
    conv2 = next(op for op in analysis.ops if op.node == "conv2")
    assert conv2.memory_bytes == 8 * 64 + 12 * 36 + 12 * 72  # uint8 in and out, int8 weights
    # the integer weights, the int32 bias, and the float per-channel scale and bias after ConvInteger
    assert analysis.total.params == 8 * 27 + 12 * 72 + 12 + 12 * 6 + 6 * 5 + 8 + 8
    alive = np.ones(analysis.graph.num_classes, dtype=bool)
    for group in analysis.graph.groups:
        if group.prunable:
            alive[np.asarray(group.classes)[[0, 2]]] = False
    result = prune(path, Mask(mask_document(analysis.graph, alive)))
    assert [(w.node, w.after) for w in result.widths] == [("conv1", 6), ("conv2", 10), ("fc1", 4), ("fc2", 5)]
    assert result.masked_deviation.max_abs == 0
    shapes = _initializer_shapes(result.model)
    assert shapes["w1"] == [6, 3, 3, 3] and shapes["s1"] == shapes["b1"] == [1, 6, 1, 1]
    assert shapes["w2"] == [10, 6, 3, 3] and shapes["w2s"] == shapes["w2z"] == shapes["B2"] == [10]
    assert shapes["wb"] == [10, 4] and shapes["sb"] == shapes["zb"] == [4]
    assert shapes["wc"] == [4, 5] and shapes["wcz"] == [5]
    assert shapes["w1z"] == shapes["ys"] == []  # per-tensor ones stay


def _save_3_to_4(nodes, values: dict, path) -> str:
    """A graph from a [1, 3, 8, 8] input x to a [1, 4, 8, 8] output y, opset 17, saved at `path`."""
    graph = onnx.helper.make_graph(
        nodes, Path(path).stem,
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v, name) for name, v in values.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _activation_qdq_model(path, axis: int) -> str:
    """Conv -> QuantizeLinear/DequantizeLinear with per-channel scales on `axis` -> Conv."""
    rng = np.random.default_rng(1)
    size = 6 if axis == 1 else 8
    values = {"w1": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
              "w2": rng.standard_normal((4, 6, 1, 1)).astype(np.float32),
              "s": (rng.random(size) * 0.05 + 0.01).astype(np.float32), "z": rng.integers(0, 20, size).astype(np.uint8)}
    make = onnx.helper.make_node
    nodes = [make("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             make("QuantizeLinear", ["c1", "s", "z"], ["q"], axis=axis, name="quant"),
             make("DequantizeLinear", ["q", "s", "z"], ["d"], axis=axis, name="dequant"),
             make("Conv", ["d", "w2"], ["y"], name="conv2")]
    return _save_3_to_4(nodes, values, path)


def test_activation_qdq_per_channel_scales_follow_their_channels(tmp_path):
    path = _activation_qdq_model(tmp_path / "per_channel.onnx", axis=1)
    analysis = onnx_morph.analyze(path)
    assert [(g.size, g.prunable) for g in analysis.groups] == [(3, False), (6, True), (4, False)]
    alive = np.ones(analysis.graph.num_classes, dtype=bool)
    alive[np.asarray(analysis.graph.groups[1].classes)[[1, 4]]] = False
    result = prune(path, Mask(mask_document(analysis.graph, alive)))
    assert result.masked_deviation.max_abs <= 1e-6
    shapes = _initializer_shapes(result.model)
    assert shapes["s"] == shapes["z"] == [4] and shapes["w1"] == [4, 3, 3, 3] and shapes["w2"] == [4, 4, 1, 1]


def test_activation_qdq_scales_along_another_axis_pin(tmp_path):
    analysis = onnx_morph.analyze(_activation_qdq_model(tmp_path / "per_row.onnx", axis=2))
    middle = analysis.groups[1]
    assert not middle.prunable
    assert "QuantizeLinear node 'quant' has per-channel scales on axis 2, the channels are on axes [1]" in middle.pin_reasons


def test_dynamic_quantization_pins_with_a_reason(tmp_path):
    path = _float_model(tmp_path / "float.onnx", dead=False)
    target = str(tmp_path / "dynamic.onnx")
    quantization.quantize_dynamic(path, target, weight_type=quantization.QuantType.QUInt8,
                                  op_types_to_quantize=["Conv"])
    analysis = onnx_morph.analyze(target)
    assert not analysis.unknown_ops
    reasons = {r for g in analysis.groups for r in g.pin_reasons}
    assert any("DynamicQuantizeLinear" in r and "computes its scale from all channels" in r for r in reasons)


def test_qoperator_folds_removed_constants_into_the_int32_bias(tmp_path):
    """Dead channels (zero int8 weight slices) of c2 hold a constant uint8 value; the unpadded 1x1
    QLinearConv c3 adds (q - x_zero) * (w - w_zero) of them to its int32 bias, exactly, and the masked
    original holds them at that value for c3 (at the zero point elsewhere)."""
    source = _float_model(tmp_path / "float.onnx", dead=True)
    path = str(tmp_path / "qop_dead.onnx")
    quantization.quantize_static(source, path, _Reader(), quant_format=quantization.QuantFormat.QOperator,
                                 per_channel=True, weight_type=quantization.QuantType.QInt8)
    result = prune(path, Threshold(weight=1e-6))
    assert [(w.before, w.after) for w in result.widths] == [(8, 6), (12, 9), (12, 9), (5, 5)]
    assert result.masked_deviation.max_abs == 0
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    pruned = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    kept = np.setdiff1d(np.arange(12), [0, 5, 7])
    bias = pruned["c3.bias_quantized::pruned"]
    assert bias.dtype == np.int32 and not np.array_equal(bias, original["c3.bias_quantized"][kept])


def test_weight_quantized_at_run_time_slices_both_nodes_scales(tmp_path):
    """A float weight -> QuantizeLinear -> DequantizeLinear (per-channel, axis 0) -> Conv: the float
    initializer is sliced, and both nodes' scales and zero points with it."""
    rng = np.random.default_rng(2)
    values = {"w1": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
              "s": (rng.random(6) * 0.02 + 0.01).astype(np.float32), "z": np.zeros(6, np.int8),
              "w2": rng.standard_normal((4, 6, 1, 1)).astype(np.float32)}
    make = onnx.helper.make_node
    nodes = [make("QuantizeLinear", ["w1", "s", "z"], ["w1q"], axis=0, name="quant_w1"),
             make("DequantizeLinear", ["w1q", "s", "z"], ["w1d"], axis=0, name="dequant_w1"),
             make("Conv", ["x", "w1d"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             make("Relu", ["c1"], ["r1"], name="relu1"),
             make("Conv", ["r1", "w2"], ["y"], name="conv2")]
    path = _save_3_to_4(nodes, values, tmp_path / "runtime_quantized.onnx")
    analysis = onnx_morph.analyze(path)
    alive = np.ones(analysis.graph.num_classes, dtype=bool)
    alive[np.asarray(analysis.graph.groups[1].classes)[[0, 3]]] = False
    result = prune(path, Mask(mask_document(analysis.graph, alive)))
    assert result.masked_deviation.max_abs <= 1e-5
    pruned = {n.name: n for n in result.model.graph.node}
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert [shapes[i] for i in pruned["quant_w1"].input] == [[4, 3, 3, 3], [4], [4]]
    assert [shapes[i] for i in pruned["dequant_w1"].input[1:]] == [[4], [4]]
