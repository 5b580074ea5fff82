"""Quantized graphs (issue 17, item 5).

QDQ models as onnxruntime's quantize_static writes them (QuantFormat.QDQ, per-tensor and
per-channel weight scales) from a small CNN exported from torch (random init, a residual add, a
Linear head): `analyze` sees through DequantizeLinear(int8 weight) and counts memory at the stored
precision; `prune` slices the int8 weights with their per-channel scales and zero points, and the
pruned model equals the zero-masked original in onnxruntime.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import onnx_morph
from onnx_morph.rewrite import prune
from onnx_morph.rewrite.select import mask_document

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
    result = prune(path, weight_threshold=1e-6)
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
    if per_channel:
        assert shapes["c1.weight_scale"] == shapes["c1.weight_zero_point"] == [6]
        assert shapes["c2.weight_scale"] == [9] and shapes["c2.bias_quantized_scale"] == [9]
        assert shapes["fc.weight_scale"] == [5]  # the logits stay
    else:
        assert all(shapes[name] in ([], [1]) for name in shapes if name.endswith(("_scale", "_zero_point")))
    pruned = onnx_morph.analyze(result.model)
    assert pruned.total.flops == result.after.flops
    assert pruned.total.memory_bytes == analysis.effective.memory_bytes


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_random_masks_equal_the_masked_original(tmp_path, per_channel):
    """Channels that are not dead: the pruned model equals the original with them zeroed."""
    _, path = _qdq_model(tmp_path, per_channel)
    analysis = onnx_morph.analyze(path)
    alive = np.ones(analysis.graph.num_classes, dtype=bool)
    for group in analysis.graph.groups:
        if group.prunable:
            alive[np.asarray(group.classes)[[0, 2, 3]]] = False
    result = prune(path, masks=mask_document(analysis.graph, alive))
    assert result.removed_channels == 6
    assert result.masked_deviation.max_abs <= 1e-5
    assert [w.after for w in result.widths] == [5, 9, 9, 5]
