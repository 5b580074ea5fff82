"""Graphs optimized by onnxruntime (ORT_ENABLE_EXTENDED writes com.microsoft FusedConv, FusedMatMul,
BiasGelu, QuickGelu, SkipLayerNormalization, and the default-domain SimplifiedLayerNormalization) analyze
as their unoptimized exports do and prune exactly; the fused attention kernel is pinned with its op named."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnx_morph
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.surgery.select import mask_document
from onnx_morph.rewrite.surgery.verify import onnxruntime as _onnxruntime

from tools.bench_llama_scale import build_llama
from test_transformers import _bert, _bert_tokens, _export

REL_TOL = 1e-4


def _optimize(source: Path, target: Path) -> collections.Counter:
    """onnxruntime's extended graph optimizations on CPU, saved; the op types it wrote."""
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(target)).graph.node)


def _summary(analysis) -> tuple:
    return (sorted((g.size, g.prunable) for g in analysis.groups), analysis.total.flops)


def _prune_half(path: Path) -> tuple[onnx_morph.Analysis, object]:
    """Prune a random half of every prunable group (verified against the masked original)."""
    analysis = onnx_morph.analyze(str(path))
    graph, rng = analysis.graph, np.random.default_rng(0)
    alive = np.ones(graph.num_classes, dtype=bool)
    for group in graph.groups:
        if group.prunable:
            alive[rng.choice(group.classes, size=group.size // 2, replace=False)] = False
    result = prune(str(path), Mask(mask_document(graph, alive)))
    assert result.removed_channels == int((~alive).sum()) > 0
    assert result.masked_deviation is not None and result.masked_deviation.max_rel < REL_TOL
    return analysis, result


class ResidualCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head, self.fc = nn.Conv2d(8, 12, 1), nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x) + x)
        return self.fc(torch.sigmoid(self.head(x)).mean((2, 3)))


def test_fused_conv_prunes_like_conv(tmp_path):
    torch.manual_seed(0)
    plain = tmp_path / "cnn.onnx"
    torch.onnx.export(ResidualCnn().eval(), (torch.randn(1, 3, 8, 8),), str(plain), dynamo=False,
                      do_constant_folding=False, opset_version=17)
    optimized = tmp_path / "cnn_opt.onnx"
    ops = _optimize(plain, optimized)
    assert ops["FusedConv"] == 2 and ops["Conv"] == 1  # stem + Relu, head + Sigmoid; the residual conv stays

    analysis, result = _prune_half(optimized)
    assert _summary(analysis) == _summary(onnx_morph.analyze(str(plain)))
    assert [g.size for g in analysis.groups if g.prunable] == [8, 12]  # the residual stream, the head
    assert collections.Counter(n.op_type for n in result.model.graph.node)["FusedConv"] == ops["FusedConv"]
    assert onnx_morph.analyze(result.model).total.flops < analysis.total.flops


def test_optimized_bert_keeps_its_heads_and_mlp_units(tmp_path):
    plain = _export(_bert(), torch.from_numpy(_bert_tokens(np.random.default_rng(0))), tmp_path / "bert.onnx")
    optimized = tmp_path / "bert_opt.onnx"
    ops = _optimize(plain, optimized)
    assert {"SkipLayerNormalization", "FusedMatMul", "BiasGelu", "FusedGemm"} <= set(ops)

    analysis, result = _prune_half(optimized)
    assert _summary(analysis) == _summary(onnx_morph.analyze(str(plain)))
    assert sorted(g.size for g in analysis.groups if g.prunable) == [4, 4, 64, 128, 128]  # heads, pooler, MLPs
    hidden = next(g for g in analysis.groups if g.size == 64 and not g.prunable)
    assert any("SkipLayerNormalization" in r and "normalizes" in r for r in hidden.pin_reasons)


def test_optimized_llama_rms_norm_and_quick_gelu(tmp_path):
    plain = tmp_path / "llama.onnx"
    count = build_llama(plain, layers=2, hidden=32, intermediate=48, heads=4, vocab=20, tokens=6)
    weights = np.random.default_rng(0).standard_normal(count).astype(np.float32) * 0.2
    (tmp_path / "llama.onnx.data").write_bytes(weights.tobytes())
    optimized = tmp_path / "llama_opt.onnx"
    ops = _optimize(plain, optimized)
    assert {"SimplifiedLayerNormalization", "QuickGelu", "FusedMatMul"} <= set(ops)
    assert "ReduceMean" not in ops and "Sigmoid" not in ops

    analysis, _ = _prune_half(optimized)
    assert _summary(analysis) == _summary(onnx_morph.analyze(str(plain)))
    assert sorted(g.size for g in analysis.groups if g.prunable) == [4, 4, 48, 48]
    hidden = next(g for g in analysis.groups if g.size == 32)
    assert any("SimplifiedLayerNormalization" in r for r in hidden.pin_reasons)


def _attention_model() -> onnx.ModelProto:
    """x -> MatMul -> FastGelu(bias) -> QuickGelu -> MatMul -> SimplifiedLayerNormalization -> Attention -> MatMul."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    ms = "com.microsoft"
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("FastGelu", ["h1", "b1"], ["g1"], name="fast_gelu", domain=ms),
        helper.make_node("QuickGelu", ["g1"], ["g2"], name="quick_gelu", domain=ms, alpha=1.702),
        helper.make_node("MatMul", ["g2", "w2"], ["h2"], name="fc2"),
        helper.make_node("SimplifiedLayerNormalization", ["h2", "scale"], ["n"], name="rms", axis=-1, epsilon=1e-5),
        helper.make_node("Attention", ["n", "wqkv", "bqkv"], ["att"], name="attention", domain=ms, num_heads=2),
        helper.make_node("MatMul", ["att", "w3"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])],
        [weight("w1", 16, 32), weight("b1", 32), weight("w2", 32, 16), weight("scale", 16), weight("wqkv", 16, 48),
         weight("bqkv", 48), weight("w3", 16, 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])


def test_attention_kernel_is_pinned_with_its_name_and_gelu_units_prune(tmp_path):
    path = tmp_path / "fused.onnx"
    onnx.save(_attention_model(), str(path))
    analysis, result = _prune_half(path)
    assert sorted((g.size, g.prunable) for g in analysis.groups) == [(4, False), (16, False), (16, False),
                                                                      (16, False), (32, True)]
    assert next(g for g in analysis.groups if g.prunable).producers == ["fc1"]
    reasons = [r for g in analysis.groups for r in g.pin_reasons]
    assert any(r.startswith("Attention node 'attention' (com.microsoft) is a fused attention kernel") for r in reasons)
    assert any(r.startswith("SimplifiedLayerNormalization node 'rms'") for r in reasons)
    # FastGelu's bias and fc2's rows shrink with the removed units.
    sizes = {t.name.split("::")[0]: list(t.dims) for t in result.model.graph.initializer}
    assert sizes["b1"] == [16] and sizes["w1"] == [16, 16] and sizes["w2"] == [16, 16] and sizes["wqkv"] == [16, 48]
    # Attention costs its packed QKV projection.
    assert analysis.total.flops == 2 * 8 * (16 * 32 + 32 * 16 + 16 * 48 + 16 * 4)
    assert analysis.total.params == 16 * 32 + 32 + 32 * 16 + 16 + 16 * 48 + 48 + 16 * 4


@pytest.mark.parametrize("op, inputs, attrs, expected", [
    ("FusedMatMul", [(2, 3, 5, 4), (4, 6)], {"transA": 1, "transB": 1}, [(2, 3, 4, 4)]),
    ("FusedConv", [(1, 3, 9, 9), (8, 3, 3, 3)], {"strides": [2, 2], "activation": "Relu"}, [(1, 8, 4, 4)]),
    ("SkipLayerNormalization", [(1, 5, 8), (1, 5, 8), (8,)], {}, [(1, 5, 8), (1, 5, 1), (1, 5, 1), (1, 5, 8)]),
    ("GroupQueryAttention", [(1, 5, 64)], {"num_heads": 4, "kv_num_heads": 2}, [(1, 5, 32)]),
    ("Attention", [(1, 5, 16), (16, 48)], {"num_heads": 2}, [(1, 5, 16)]),
    ("MultiHeadAttention", [(1, 5, 16), (1, 7, 16), (1, 7, 24)], {"num_heads": 2}, [(1, 5, 24)]),
    ("RotaryEmbedding", [(1, 2, 5, 8), (5,), (16, 4), (16, 4)], {}, [(1, 2, 5, 8)]),
])
def test_output_shapes_onnx_cannot_infer(op, inputs, attrs, expected):
    from onnx_morph.handlers import handler_for

    outputs = [f"y{i}" for i in range(len(expected))]
    node = helper.make_node(op, [f"x{i}" for i in range(len(inputs))], outputs, domain="com.microsoft", **attrs)
    assert handler_for(op, "com.microsoft").output_shapes(node, inputs) == expected



def _conv_head_model(shortcut: bool) -> onnx.ModelProto:
    """FusedConv(Relu) [-> FusedConv with a FusedConv shortcut as Z] -> pool -> FusedMatMul with a [out, in] weight."""
    rng = np.random.default_rng(1)

    def weight(name: str, *shape: int):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    ms = "com.microsoft"
    nodes = [helper.make_node("FusedConv", ["x", "w1", "b1"], ["a"], name="conv1", domain=ms, activation="Relu",
                              pads=[1, 1, 1, 1])]
    weights = [weight("w1", 32, 16, 3, 3), weight("b1", 32), weight("w3", 5, 32)]
    if shortcut:
        nodes += [helper.make_node("FusedConv", ["x", "ws"], ["z"], name="shortcut", domain=ms, activation="Relu"),
                  helper.make_node("FusedConv", ["a", "w2", "b2", "z"], ["c"], name="conv2", domain=ms,
                                   activation="Relu")]
        weights += [weight("ws", 32, 16, 1, 1), weight("w2", 32, 32, 1, 1), weight("b2", 32)]
    nodes += [helper.make_node("GlobalAveragePool", ["c" if shortcut else "a"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
              helper.make_node("FusedMatMul", ["f", "w3"], ["y"], name="fc", domain=ms, transB=1, alpha=0.5)]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])


def test_fused_matmul_with_a_transposed_weight_prunes_its_columns(tmp_path):
    path = tmp_path / "fused_conv.onnx"
    onnx.save(_conv_head_model(shortcut=False), str(path))
    analysis, result = _prune_half(path)
    assert [(g.size, g.producers) for g in analysis.groups if g.prunable] == [(32, ["conv1"])]
    sizes = {t.name.split("::")[0]: list(t.dims) for t in result.model.graph.initializer}
    assert sizes["w1"] == [16, 16, 3, 3] and sizes["b1"] == [16] and sizes["w3"] == [5, 16]
    assert analysis.total.flops == 2 * (36 * 9 * 16 * 32 + 32 * 5)
    assert analysis.total.params == 32 * 16 * 9 + 32 + 5 * 32


def test_fused_conv_with_a_shortcut_input_is_pinned(tmp_path):
    """onnxruntime 1.19 runs this graph differently at ORT_ENABLE_ALL (NCHWc) than without optimizations."""
    path = tmp_path / "shortcut.onnx"
    onnx.save(_conv_head_model(shortcut=True), str(path))
    analysis = onnx_morph.analyze(str(path))
    assert not any(g.prunable for g in analysis.groups)
    reasons = {r for g in analysis.groups for r in g.pin_reasons}
    assert "FusedConv node 'conv2' (com.microsoft) adds a Z input, which onnxruntime computes differently by " \
           "optimization level" in reasons
    assert analysis.total.flops == 2 * (36 * 9 * 16 * 32 + 36 * 16 * 32 + 36 * 32 * 32 + 32 * 5)


def test_scores_as_fused_matmul_with_transposed_keys_keep_heads(tmp_path):
    """q @ k^T written as FusedMatMul(q, k, transB=1, alpha) on [B, H, T, D] keys: heads stay whole and prune."""
    plain = tmp_path / "llama.onnx"
    count = build_llama(plain, layers=1, hidden=32, intermediate=48, heads=4, vocab=20, tokens=6)
    (tmp_path / "llama.onnx.data").write_bytes(
        (np.random.default_rng(0).standard_normal(count) * 0.2).astype(np.float32).tobytes())
    model = onnx.load(str(plain))
    for node in model.graph.node:
        if node.name.endswith("k_transpose"):
            node.attribute[0].ints[:] = [0, 2, 1, 3]
        if node.name.endswith("/scores"):
            node.op_type, node.domain = "FusedMatMul", "com.microsoft"
            node.attribute.extend([helper.make_attribute("transB", 1), helper.make_attribute("alpha", 0.5)])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    path = tmp_path / "fused_scores.onnx"
    onnx.save(model, str(path))

    analysis, result = _prune_half(path)
    assert sorted(g.size for g in analysis.groups if g.prunable) == [4, 48]
    assert analysis.total.flops == onnx_morph.analyze(str(plain)).total.flops
    sizes = {t.name.split("::")[0]: list(t.dims) for t in result.model.graph.initializer}
    assert sizes["layers.0/self_attn/k_proj.weight"] == [32, 16]  # 2 of 4 heads of 8 dims
