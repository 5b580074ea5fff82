"""Exact channel groups, pins and costs of the zoo models.

Every model is exported once per module (the `zoo_model` fixture caches by name and variant) and
analyzed with `analyze()`. Group facts are checked against the model's structure; FLOPs and
parameters are written out by hand from the layer shapes:

    Conv           FLOPs = 2 * H_out * W_out * k * k * (C_in / groups) * C_out
    ConvTranspose  FLOPs = 2 * H_in  * W_in  * k * k * (C_in / groups) * C_out
    Gemm / MatMul  FLOPs = 2 * rows * K * N
    params: weights + biases + norm scales and shifts (BN running stats are buffers, not counted)

Effective-cost tests zero some BatchNorm gammas in the torch module before export and analyze
with gamma_threshold=1e-3; a channel class dies only if every gamma it has is at or below the
threshold, and pinned classes never die.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnx_morph.analysis import analyze

from tools import zoo

THRESHOLD = 1e-3
IN_PIN = "graph input 'input'"
OUT_PIN = "graph output 'output'"


# --------------------------------------------------------------------------- #
# Fixtures and helpers
# --------------------------------------------------------------------------- #


def _set(module, param: str, index, value: float = 0.0) -> None:
    """Set entries `index` of the parameter `param` (dotted name) to `value`."""
    with torch.no_grad():
        dict(module.named_parameters())[param][index] = value


# Variants: (model name, [(param, index[, value]), ...]): gammas/weights set (default: zeroed)
# in the torch module before export.
VARIANTS = {
    "ConvStack-dead": ("ConvStack", [("bn1.weight", [1, 5]), ("bn2.weight", [0, 3, 7])]),
    "BasicBlock-dead": ("BasicBlock", [
        ("bn1.weight", slice(2, 6)),
        # the residual group: bn2 alone zero keeps it alive (downsample BN still strong) ...
        ("bn2.weight", slice(0, 4)),
        # ... and both zero still keeps it alive: it is pinned by the graph output
        ("downsample.1.weight", slice(0, 2)),
    ]),
    "ResNeXtBlock-dead": ("ResNeXtBlock", [
        # conv-group 1 (channels 4..7): zero in bn1 and bn2 -> the whole group dies
        ("bn1.weight", slice(4, 8)), ("bn2.weight", slice(4, 8)),
        # conv-group 3: only channel 12 zero in both; 13..15 keep the group (one class) alive
        ("bn1.weight", [12]), ("bn2.weight", [12]),
        # conv-group 0: only bn2 zero; bn1 keeps it alive
        ("bn2.weight", slice(0, 4)),
    ]),
    "InvertedResidual-dead": ("InvertedResidual", [
        # class 3 of the 8-channel group: every gamma it has is zero (dw multiplier 2 -> 6, 7)
        ("stem.bn.weight", [3]), ("block1.project.bn.weight", [3]), ("block2.dw.bn.weight", [6, 7]),
        # class 5: one of its two depthwise outputs (11) keeps a gamma -> alive
        ("stem.bn.weight", [5]), ("block1.project.bn.weight", [5]), ("block2.dw.bn.weight", [10]),
        # expanded channels 0..5: zero in both the expand BN and the depthwise BN -> dead
        ("block1.expand.bn.weight", slice(0, 6)), ("block1.dw.bn.weight", slice(0, 6)),
        # expanded channel 10: only the expand BN -> alive
        ("block1.expand.bn.weight", [10]),
    ]),
    "DenseBlock-dead": ("DenseBlock", [
        # stem channel 2: zero in all three BNs that read it -> dead
        ("layer1.bn.weight", [2]), ("layer2.bn.weight", [2]), ("head.bn.weight", [2]),
        # stem channel 6: head BN still strong -> alive
        ("layer1.bn.weight", [6]), ("layer2.bn.weight", [6]),
        # layer1's new channel 1 (concat index 8 + 1 = 9)
        ("layer2.bn.weight", [9]), ("head.bn.weight", [9]),
        # layer2's new channel 0 (concat index 12)
        ("head.bn.weight", [12]),
    ]),
    "InceptionBlock-dead": ("InceptionBlock", [
        ("stem.bn.weight", [7]),
        ("branch2.0.bn.weight", [1]),
        ("branch3.0.bn.weight", [0]),
        ("branch1.bn.weight", [0]),  # pinned by the concat being the graph output: stays
    ]),
    "SplitBlock-dead": ("SplitBlock", [("stem.bn.weight", [5, 12])]),
    "ShuffleUnit-dead": ("ShuffleUnit", [
        ("stem.bn.weight", [0, 9]),  # 0: x1 half (reaches the output, pinned); 9: x2 half
        ("branch2.0.bn.weight", [2, 5]), ("branch2.1.bn.weight", [5]),  # 5 dies, 2 lives
    ]),
    "FlattenHead-dead": ("FlattenHead", [("features.bn.weight", [0, 3])]),
    "ConvTransposeNet-dead": ("ConvTransposeNet", [("down.bn.weight", [4]), ("up_bn.weight", [1])]),
    "UnknownOpNet-dead": ("UnknownOpNet", [("features.bn.weight", [0, 1, 2])]),
    # weight-threshold variants
    "TransformerBlock-deadfc1": ("TransformerBlock", [("fc1.weight", slice(3, 5))]),
    # fc1 row 2 = 5e-4 everywhere: slice RMS 5e-4 <= 1e-3 (dead), though its L2 norm is 2e-3
    "SEBlock-deadfc1": ("SEBlock", [("fc1.weight", [1]), ("fc1.weight", [2], 5e-4)]),
    # |gamma| counts: -0.7 is alive, -5e-4 is dead
    "ConvStack-neg": ("ConvStack", [("bn1.weight", [0], -0.7), ("bn1.weight", [1], -5e-4)]),
}


@pytest.fixture(scope="module")
def zoo_model(tmp_path_factory):
    """zoo_model(key) -> (torch module, onnx path). Exported once per module."""
    root = tmp_path_factory.mktemp("channel_groups")
    cache = {}

    def get(key: str):
        if key not in cache:
            name, zeros = VARIANTS.get(key, (key, []))
            factory, shape = zoo.ZOO[name]
            module = factory()
            for param, index, *value in zeros:
                _set(module, param, index, *value)
            cache[key] = (module, zoo.export_onnx(module, shape, root / f"{key}.onnx"))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def analysis_of(zoo_model):
    """analysis_of(key, **kwargs) -> Analysis, cached per (key, kwargs)."""
    cache = {}

    def get(key: str, **kwargs):
        ck = (key, tuple(sorted(kwargs.items())))
        if ck not in cache:
            cache[ck] = analyze(zoo_model(key)[1], **kwargs)
        return cache[ck]

    return get


def groups_with(a, *, producer=None, source=None, tensor=None):
    out = []
    for g in a.groups:
        if producer is not None and producer not in g.producers:
            continue
        if source is not None and source not in g.sources:
            continue
        if tensor is not None and tensor not in g.tensors:
            continue
        out.append(g)
    return out


def one_group(a, **kw):
    found = groups_with(a, **kw)
    assert len(found) == 1, f"{kw}: {len(found)} groups: {[g.id for g in found]}"
    return found[0]


def out_of(a, node: str) -> str:
    return a.graph.nodes[node].output[0]


def op(a, node: str):
    (found,) = [o for o in a.ops if o.node == node]
    return found


def channel_group(a, g):
    """The library's ChannelGroup behind a GroupReport (has per-tensor channel indices)."""
    cg = a.graph.groups[g.id]
    assert cg.id == g.id
    return cg


# --------------------------------------------------------------------------- #
# Hand-computed FLOPs and params, all channels alive
# --------------------------------------------------------------------------- #

BN = "BatchNormalization"

# node -> (flops, params); every node not listed must have 0 flops and 0 params.
EXPECTED_COSTS = {
    "ConvStack": {
        "/conv1/Conv": (2 * 16 * 16 * 3 * 3 * 3 * 8, 3 * 3 * 3 * 8),
        "/bn1/BatchNormalization": (0, 2 * 8),
        "/conv2/Conv": (2 * 8 * 8 * 3 * 3 * 8 * 16, 3 * 3 * 8 * 16),  # stride 2 -> 8x8
        "/bn2/BatchNormalization": (0, 2 * 16),
        "/conv3/Conv": (2 * 8 * 8 * 1 * 1 * 16 * 16, 16 * 16 + 16),
    },
    "BasicBlock": {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 8, 9 * 3 * 8),
        "/stem/bn/BatchNormalization": (0, 2 * 8),
        "/conv1/Conv": (2 * 8 * 8 * 9 * 8 * 16, 9 * 8 * 16),
        "/bn1/BatchNormalization": (0, 2 * 16),
        "/conv2/Conv": (2 * 8 * 8 * 9 * 16 * 16, 9 * 16 * 16),
        "/bn2/BatchNormalization": (0, 2 * 16),
        "/downsample/downsample.0/Conv": (2 * 8 * 8 * 1 * 8 * 16, 8 * 16),
        "/downsample/downsample.1/BatchNormalization": (0, 2 * 16),
    },
    "Bottleneck": {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 16, 9 * 3 * 16),
        "/stem/bn/BatchNormalization": (0, 2 * 16),
        "/conv1/Conv": (2 * 16 * 16 * 1 * 16 * 8, 16 * 8),
        "/bn1/BatchNormalization": (0, 2 * 8),
        "/conv2/Conv": (2 * 16 * 16 * 9 * 8 * 8, 9 * 8 * 8),
        "/bn2/BatchNormalization": (0, 2 * 8),
        "/conv3/Conv": (2 * 16 * 16 * 1 * 8 * 32, 8 * 32),
        "/bn3/BatchNormalization": (0, 2 * 32),
        "/downsample/downsample.0/Conv": (2 * 16 * 16 * 1 * 16 * 32, 16 * 32),
        "/downsample/downsample.1/BatchNormalization": (0, 2 * 32),
    },
    "InvertedResidual": {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 8, 9 * 3 * 8),
        "/stem/bn/BatchNormalization": (0, 2 * 8),
        "/block1/expand/conv/Conv": (2 * 16 * 16 * 1 * 8 * 24, 8 * 24),
        "/block1/expand/bn/BatchNormalization": (0, 2 * 24),
        # depthwise: groups = 24, C_in / groups = 1
        "/block1/dw/conv/Conv": (2 * 16 * 16 * 9 * (24 // 24) * 24, 9 * 1 * 24),
        "/block1/dw/bn/BatchNormalization": (0, 2 * 24),
        "/block1/project/conv/Conv": (2 * 16 * 16 * 1 * 24 * 8, 24 * 8),
        "/block1/project/bn/BatchNormalization": (0, 2 * 8),
        # depthwise multiplier 2, stride 2: groups = 8, 8 -> 16, output 8x8
        "/block2/dw/conv/Conv": (2 * 8 * 8 * 9 * (8 // 8) * 16, 9 * 1 * 16),
        "/block2/dw/bn/BatchNormalization": (0, 2 * 16),
        "/block2/project/conv/Conv": (2 * 8 * 8 * 1 * 16 * 16, 16 * 16),
        "/block2/project/bn/BatchNormalization": (0, 2 * 16),
    },
    "ResNeXtBlock": {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 16, 9 * 3 * 16),
        "/stem/bn/BatchNormalization": (0, 2 * 16),
        "/conv1/Conv": (2 * 16 * 16 * 1 * 16 * 16, 16 * 16),
        "/bn1/BatchNormalization": (0, 2 * 16),
        "/conv2/Conv": (2 * 16 * 16 * 9 * (16 // 4) * 16, 9 * (16 // 4) * 16),  # groups = 4
        "/bn2/BatchNormalization": (0, 2 * 16),
        "/conv3/Conv": (2 * 16 * 16 * 1 * 16 * 16, 16 * 16),
        "/bn3/BatchNormalization": (0, 2 * 16),
    },
    "DenseBlock": {
        "/stem/Conv": (2 * 16 * 16 * 9 * 3 * 8, 9 * 3 * 8),
        "/layer1/bn/BatchNormalization": (0, 2 * 8),
        "/layer1/conv/Conv": (2 * 16 * 16 * 9 * 8 * 4, 9 * 8 * 4),
        "/layer2/bn/BatchNormalization": (0, 2 * 12),
        "/layer2/conv/Conv": (2 * 16 * 16 * 9 * 12 * 4, 9 * 12 * 4),
        "/head/bn/BatchNormalization": (0, 2 * 16),
        "/head/conv/Conv": (2 * 16 * 16 * 1 * 16 * 16, 16 * 16),
    },
    "InceptionBlock": {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 8, 9 * 3 * 8),
        "/stem/bn/BatchNormalization": (0, 2 * 8),
        "/branch1/conv/Conv": (2 * 16 * 16 * 1 * 8 * 4, 8 * 4),
        "/branch1/bn/BatchNormalization": (0, 2 * 4),
        "/branch2/branch2.0/conv/Conv": (2 * 16 * 16 * 1 * 8 * 4, 8 * 4),
        "/branch2/branch2.0/bn/BatchNormalization": (0, 2 * 4),
        "/branch2/branch2.1/conv/Conv": (2 * 16 * 16 * 9 * 4 * 4, 9 * 4 * 4),
        "/branch2/branch2.1/bn/BatchNormalization": (0, 2 * 4),
        "/branch3/branch3.0/conv/Conv": (2 * 16 * 16 * 1 * 8 * 2, 8 * 2),
        "/branch3/branch3.0/bn/BatchNormalization": (0, 2 * 2),
        "/branch3/branch3.1/conv/Conv": (2 * 16 * 16 * 25 * 2 * 4, 25 * 2 * 4),
        "/branch3/branch3.1/bn/BatchNormalization": (0, 2 * 4),
        "/branch4/branch4.1/conv/Conv": (2 * 16 * 16 * 1 * 8 * 4, 8 * 4),
        "/branch4/branch4.1/bn/BatchNormalization": (0, 2 * 4),
    },
    "SplitBlock": {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 16, 9 * 3 * 16),
        "/stem/bn/BatchNormalization": (0, 2 * 16),
        "/chunk_a/conv/Conv": (2 * 16 * 16 * 9 * 8 * 8, 9 * 8 * 8),
        "/chunk_a/bn/BatchNormalization": (0, 2 * 8),
        "/chunk_b/conv/Conv": (2 * 16 * 16 * 9 * 8 * 8, 9 * 8 * 8),
        "/chunk_b/bn/BatchNormalization": (0, 2 * 8),
        "/split_c/conv/Conv": (2 * 16 * 16 * 1 * 4 * 4, 4 * 4),
        "/split_c/bn/BatchNormalization": (0, 2 * 4),
        "/split_d/conv/Conv": (2 * 16 * 16 * 1 * 12 * 12, 12 * 12),
        "/split_d/bn/BatchNormalization": (0, 2 * 12),
    },
    "ShuffleUnit": {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 16, 9 * 3 * 16),
        "/stem/bn/BatchNormalization": (0, 2 * 16),
        "/branch2/branch2.0/conv/Conv": (2 * 16 * 16 * 1 * 8 * 8, 8 * 8),
        "/branch2/branch2.0/bn/BatchNormalization": (0, 2 * 8),
        "/branch2/branch2.1/conv/Conv": (2 * 16 * 16 * 9 * (8 // 8) * 8, 9 * 1 * 8),  # depthwise
        "/branch2/branch2.1/bn/BatchNormalization": (0, 2 * 8),
        "/branch2/branch2.2/conv/Conv": (2 * 16 * 16 * 1 * 8 * 8, 8 * 8),
        "/branch2/branch2.2/bn/BatchNormalization": (0, 2 * 8),
    },
    "SEBlock": {
        "/features/conv/Conv": (2 * 16 * 16 * 9 * 3 * 16, 9 * 3 * 16),
        "/features/bn/BatchNormalization": (0, 2 * 16),
        "/fc1/Conv": (2 * 1 * 1 * 1 * 16 * 4, 16 * 4 + 4),  # after global pooling: 1x1 positions
        "/fc2/Conv": (2 * 1 * 1 * 1 * 4 * 16, 4 * 16 + 16),
    },
    "FlattenHead": {
        "/features/conv/Conv": (2 * 8 * 8 * 9 * 3 * 8, 9 * 3 * 8),
        "/features/bn/BatchNormalization": (0, 2 * 8),
        "/fc/Gemm": (2 * 1 * (8 * 8 * 8) * 10, 512 * 10 + 10),
    },
    "TransformerBlock": {
        "/ln1/LayerNormalization": (0, 2 * 16),
        "/q_proj/MatMul": (2 * 6 * 16 * 16, 16 * 16), "/q_proj/Add": (0, 16),
        "/k_proj/MatMul": (2 * 6 * 16 * 16, 16 * 16), "/k_proj/Add": (0, 16),
        "/v_proj/MatMul": (2 * 6 * 16 * 16, 16 * 16), "/v_proj/Add": (0, 16),
        # q @ k^T: per batch and head, [T, hd] x [hd, T]; att @ v: [T, T] x [T, hd]
        "/MatMul": (2 * 1 * 2 * 6 * 8 * 6, 0),
        "/MatMul_1": (2 * 1 * 2 * 6 * 6 * 8, 0),
        "/out_proj/MatMul": (2 * 6 * 16 * 16, 16 * 16), "/out_proj/Add": (0, 16),
        "/ln2/LayerNormalization": (0, 2 * 16),
        "/fc1/MatMul": (2 * 6 * 16 * 32, 16 * 32), "/fc1/Add": (0, 32),
        "/fc2/MatMul": (2 * 6 * 32 * 16, 32 * 16), "/fc2/Add": (0, 16),
    },
    "ConvTransposeNet": {
        "/down/conv/Conv": (2 * 8 * 8 * 9 * 3 * 8, 9 * 3 * 8),  # stride 2 -> 8x8
        "/down/bn/BatchNormalization": (0, 2 * 8),
        # ConvTranspose counts input positions: 8x8 input, k=2, 8 -> 4
        "/up/ConvTranspose": (2 * 8 * 8 * 2 * 2 * 8 * 4, 8 * 4 * 2 * 2),
        "/up_bn/BatchNormalization": (0, 2 * 4),
        "/head/Conv": (2 * 16 * 16 * 9 * 4 * 3, 9 * 4 * 3 + 3),
    },
    "UnknownOpNet": {
        "/features/conv/Conv": (2 * 16 * 16 * 9 * 3 * 8, 9 * 3 * 8),
        "/features/bn/BatchNormalization": (0, 2 * 8),
        "/head/Conv": (2 * 16 * 16 * 1 * 8 * 8, 8 * 8 + 8),
    },
}


def test_expected_costs_cover_every_zoo_model():
    assert set(EXPECTED_COSTS) == set(zoo.ZOO)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_flops_and_params_per_op_and_total(name, zoo_model, analysis_of):
    module, _ = zoo_model(name)
    a = analysis_of(name)
    expected = EXPECTED_COSTS[name]
    got = {o.node: (o.flops, o.params) for o in a.ops}
    assert set(expected) <= set(got), set(expected) - set(got)
    for node, value in got.items():
        assert value == expected.get(node, (0, 0)), node
    total_flops = sum(f for f, _ in expected.values())
    total_params = sum(p for _, p in expected.values())
    torch_params = sum(p.numel() for p in module.parameters())
    assert total_params == torch_params  # the hand table itself is complete
    assert a.total.params == torch_params
    assert a.total.flops == total_flops
    # nothing is dead without a threshold
    assert a.effective == a.total
    assert all(g.alive == g.size for g in a.groups)
    assert a.flop_unit == "FLOPs"


def test_op_channel_counts_grouped_and_flatten(analysis_of):
    a = analysis_of("ResNeXtBlock")
    conv2 = op(a, "/conv2/Conv")
    assert (conv2.in_alive, conv2.in_total, conv2.out_alive, conv2.out_total) == (16, 16, 16, 16)
    assert conv2.activations == 16
    g = analysis_of("FlattenHead")
    gemm = op(g, "/fc/Gemm")
    assert (gemm.in_alive, gemm.in_total, gemm.out_alive, gemm.out_total) == (512, 512, 10, 10)


@pytest.mark.parametrize("name", ["ConvTransposeNet", "TransformerBlock", "InvertedResidual"])
def test_macs_halve_flops(name, analysis_of):
    a = analysis_of(name)
    m = analysis_of(name, macs=True)
    assert m.flop_unit == "MACs"
    assert m.total.flops * 2 == a.total.flops
    assert m.total.params == a.total.params
    for full, half in zip(a.ops, m.ops):
        assert full.node == half.node
        assert half.flops * 2 == full.flops
        assert half.params == full.params
        assert half.memory_bytes == full.memory_bytes


def test_macs_halve_effective_flops(analysis_of):
    a = analysis_of("ConvStack-dead", gamma_threshold=THRESHOLD)
    m = analysis_of("ConvStack-dead", gamma_threshold=THRESHOLD, macs=True)
    assert m.effective.flops * 2 == a.effective.flops
    assert m.effective.flops == (3 * 3 * 3 * 6 * 16 * 16 + 3 * 3 * 6 * 13 * 8 * 8 + 13 * 16 * 8 * 8)


# --------------------------------------------------------------------------- #
# Group membership and pins
# --------------------------------------------------------------------------- #


def test_conv_stack_groups(analysis_of):
    a = analysis_of("ConvStack")
    assert [(g.size, g.prunable) for g in a.groups] == [(3, False), (8, True), (16, True), (16, False)]
    inp = one_group(a, tensor="input")
    assert inp.pin_reasons == [IN_PIN] and inp.sources == [] and inp.consumers == ["/conv1/Conv"]
    g1 = one_group(a, producer="/conv1/Conv")
    assert g1.sources == ["weight:conv1.weight", "gamma:bn1.weight"]
    assert g1.consumers == ["/conv2/Conv"]
    assert g1.tensors == {"/conv1/Conv_output_0": 8, "/bn1/BatchNormalization_output_0": 8, "/Relu_output_0": 8}
    g3 = one_group(a, producer="/conv3/Conv")
    assert g3.pin_reasons == [OUT_PIN] and g3.tensors == {"output": 16}
    assert a.unknown_ops == {}


@pytest.mark.parametrize("name,main,width", [
    ("BasicBlock", ("/conv2/Conv", "bn2"), 16),
    ("Bottleneck", ("/conv3/Conv", "bn3"), 32),
])
def test_residual_projection_shares_group(name, main, width, analysis_of):
    a = analysis_of(name)
    conv, bn = main
    g = one_group(a, producer=conv)
    assert g is one_group(a, producer="/downsample/downsample.0/Conv")
    assert g.size == width
    assert set(g.producers) == {conv, "/downsample/downsample.0/Conv"}
    assert sorted(g.sources) == sorted([
        f"weight:{conv.split('/')[1]}.weight", f"gamma:{bn}.weight",
        "weight:downsample.0.weight", "gamma:downsample.1.weight",
    ])
    assert g.pin_reasons == [OUT_PIN] and not g.prunable
    assert {"/Add_output_0", "output"} <= set(g.tensors)
    assert all(n == width for n in g.tensors.values())
    # the stem feeds both the main path and the shortcut
    stem = one_group(a, producer="/stem/conv/Conv")
    assert stem.prunable and stem.pin_reasons == []
    assert set(stem.consumers) == {"/conv1/Conv", "/downsample/downsample.0/Conv"}
    assert sorted(stem.sources) == ["gamma:stem.bn.weight", "weight:stem.conv.weight"]
    # the inner bottleneck layers are their own prunable groups
    for node in ["/conv1/Conv"] + (["/conv2/Conv"] if name == "Bottleneck" else []):
        inner = one_group(a, producer=node)
        assert inner.prunable and inner is not g and inner is not stem
    assert len(a.groups) == (4 if name == "BasicBlock" else 5)


def test_inverted_residual_depthwise_groups(analysis_of):
    a = analysis_of("InvertedResidual")
    cls = a.graph.classes
    # block1: residual add unites stem and project; its depthwise conv is tied to the expand group
    g8 = one_group(a, producer="/stem/conv/Conv")
    assert g8 is one_group(a, producer="/block1/project/conv/Conv")
    assert g8.size == 8 and g8.prunable
    expand = one_group(a, producer="/block1/expand/conv/Conv")
    assert expand is one_group(a, producer="/block1/dw/conv/Conv")
    assert expand.size == 24 and expand.prunable
    assert sorted(expand.sources) == sorted([
        "weight:block1.expand.conv.weight", "gamma:block1.expand.bn.weight",
        "weight:block1.dw.conv.weight", "gamma:block1.dw.bn.weight",
    ])
    dw1_in, dw1_out = out_of(a, "/block1/expand/act/Clip"), out_of(a, "/block1/dw/conv/Conv")
    np.testing.assert_array_equal(cls(dw1_out), cls(dw1_in))
    assert len(set(cls(dw1_in).tolist())) == 24
    # block2: depthwise multiplier 2 -> output k is tied to input k // 2, in the input's group
    assert g8 is one_group(a, producer="/block2/dw/conv/Conv")
    dw2_in, dw2_out = out_of(a, "/block1/Add"), out_of(a, "/block2/dw/conv/Conv")
    assert g8.tensors[dw2_in] == 8 and g8.tensors[dw2_out] == 16
    np.testing.assert_array_equal(cls(dw2_out), cls(dw2_in)[np.arange(16) // 2])
    assert len(set(cls(dw2_in).tolist())) == 8
    assert "gamma:block2.dw.bn.weight" in g8.sources and "gamma:block1.project.bn.weight" in g8.sources
    out = one_group(a, producer="/block2/project/conv/Conv")
    assert out.size == 16 and out.pin_reasons == [OUT_PIN]
    assert len(a.groups) == 4


def test_resnext_grouped_conv_group_of_four(analysis_of):
    a = analysis_of("ResNeXtBlock")
    g = one_group(a, producer="/conv2/Conv")
    assert g is one_group(a, producer="/conv1/Conv")
    assert g.size == 4 and g.prunable
    assert set(g.tensors.values()) == {16}
    assert len(g.tensors) == 6
    classes = a.graph.classes(out_of(a, "/conv2/Conv")).reshape(4, 4)
    assert all(len(set(row.tolist())) == 1 for row in classes)  # one class per conv group
    assert len(set(classes[:, 0].tolist())) == 4
    np.testing.assert_array_equal(a.graph.classes(out_of(a, "/conv1/Conv")), classes.reshape(-1))
    # identity residual: stem and conv3 share a group, pinned by the output
    res = one_group(a, producer="/stem/conv/Conv")
    assert res is one_group(a, producer="/conv3/Conv")
    assert res.size == 16 and res.pin_reasons == [OUT_PIN]


def test_densenet_concat_spans_separate_groups(analysis_of):
    a = analysis_of("DenseBlock")
    cls = a.graph.classes
    stem = one_group(a, producer="/stem/Conv")
    l1 = one_group(a, producer="/layer1/conv/Conv")
    l2 = one_group(a, producer="/layer2/conv/Conv")
    assert len({stem.id, l1.id, l2.id}) == 3
    assert (stem.size, l1.size, l2.size) == (8, 4, 4)
    assert all(g.prunable for g in (stem, l1, l2))
    np.testing.assert_array_equal(
        cls("/Concat_1_output_0"),
        np.concatenate([cls("/stem/Conv_output_0"), cls("/layer1/conv/Conv_output_0"), cls("/layer2/conv/Conv_output_0")]),
    )
    np.testing.assert_array_equal(
        cls("/Concat_output_0"), np.concatenate([cls("/stem/Conv_output_0"), cls("/layer1/conv/Conv_output_0")]),
    )
    for g in (stem, l1, l2):
        assert g.tensors["/Concat_1_output_0"] == g.size
    # each BN over a concat is a gamma source of every group whose channels it scales
    assert sorted(stem.sources) == sorted([
        "weight:stem.weight", "gamma:layer1.bn.weight", "gamma:layer2.bn.weight", "gamma:head.bn.weight",
    ])
    assert sorted(l1.sources) == sorted(["weight:layer1.conv.weight", "gamma:layer2.bn.weight", "gamma:head.bn.weight"])
    assert sorted(l2.sources) == sorted(["weight:layer2.conv.weight", "gamma:head.bn.weight"])
    assert set(stem.consumers) == {"/layer1/conv/Conv", "/layer2/conv/Conv", "/head/conv/Conv"}
    assert set(l2.consumers) == {"/head/conv/Conv"}
    np.testing.assert_array_equal(channel_group(a, l1).tensors["/Concat_1_output_0"], np.arange(8, 12))
    assert one_group(a, producer="/head/conv/Conv").pin_reasons == [OUT_PIN]


def test_inception_four_groups_meet_in_concat(analysis_of):
    a = analysis_of("InceptionBlock")
    finals = ["/branch1/conv/Conv", "/branch2/branch2.1/conv/Conv",
              "/branch3/branch3.1/conv/Conv", "/branch4/branch4.1/conv/Conv"]
    groups = [one_group(a, producer=n) for n in finals]
    assert len({g.id for g in groups}) == 4
    assert groups_with(a, tensor="output") == groups
    for k, g in enumerate(groups):
        assert g.tensors["output"] == 4
        assert g.pin_reasons == [OUT_PIN] and not g.prunable
        np.testing.assert_array_equal(channel_group(a, g).tensors["output"], np.arange(4 * k, 4 * k + 4))
    # the reductions inside branches 2 and 3 stay prunable
    assert one_group(a, producer="/branch2/branch2.0/conv/Conv").size == 4
    assert one_group(a, producer="/branch3/branch3.0/conv/Conv").size == 2
    assert one_group(a, producer="/branch3/branch3.0/conv/Conv").prunable
    # max pooling passes the stem's channels to branch 4
    stem = one_group(a, producer="/stem/conv/Conv")
    assert "/branch4/branch4.0/MaxPool_output_0" in stem.tensors and stem.prunable
    assert len(stem.consumers) == 4
    assert len(a.groups) == 8


def test_split_and_chunk_cut_the_stem(analysis_of):
    a = analysis_of("SplitBlock")
    stem_out = out_of(a, "/stem/act/Relu")
    stems = groups_with(a, producer="/stem/conv/Conv")
    ranges = [channel_group(a, g).tensors[stem_out].tolist() for g in stems]
    # chunk cuts at 8, split at 4: the intersections are [0,4), [4,8), [8,16)
    assert ranges == [list(range(0, 4)), list(range(4, 8)), list(range(8, 16))]
    consumers = [set(g.consumers) for g in stems]
    assert consumers == [
        {"/chunk_a/conv/Conv", "/split_c/conv/Conv"},
        {"/chunk_a/conv/Conv", "/split_d/conv/Conv"},
        {"/chunk_b/conv/Conv", "/split_d/conv/Conv"},
    ]
    assert all(g.prunable for g in stems)
    assert all(sorted(g.sources) == ["gamma:stem.bn.weight", "weight:stem.conv.weight"] for g in stems)
    assert [len(groups_with(a, tensor=t)) for t in ("/Slice_output_0", "/Slice_1_output_0", "/Split_output_0", "/Split_output_1")] == [2, 1, 1, 2]


def test_shufflenet_channel_permutation(analysis_of):
    # torch's semantic: output channel k of channel_shuffle(x, 2) is input channel perm[k]
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1)
    perm = zoo.channel_shuffle(x, 2).view(-1).long().numpy()
    np.testing.assert_array_equal(perm, [(k % 2) * (16 // 2) + k // 2 for k in range(16)])
    assert perm.tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]

    a = analysis_of("ShuffleUnit")
    concat = out_of(a, "/Concat")
    c_concat, c_out = a.graph.classes(concat), a.graph.classes("output")
    assert len(set(c_concat.tolist())) == 16  # every channel its own class: the check is strict
    for k in range(16):
        assert c_out[k] == c_concat[(k % 2) * 8 + k // 2], k
    assert not np.array_equal(c_out, c_concat)
    x1 = one_group(a, tensor=out_of(a, "/Slice"))
    b2 = one_group(a, producer="/branch2/branch2.2/conv/Conv")
    np.testing.assert_array_equal(channel_group(a, x1).tensors["output"], np.arange(0, 16, 2))
    np.testing.assert_array_equal(channel_group(a, b2).tensors["output"], np.arange(1, 16, 2))
    # both halves reach the graph output (a shuffle's Reshape may add its own pin reason)
    assert OUT_PIN in x1.pin_reasons and OUT_PIN in b2.pin_reasons
    assert not x1.prunable and not b2.prunable
    # the other half of the stem only feeds branch2: prunable
    x2 = one_group(a, tensor=out_of(a, "/Slice_1"))
    assert x2.prunable and x2.consumers == ["/branch2/branch2.0/conv/Conv"] and x2.size == 8
    # depthwise conv in branch2 is tied to its input's group
    dw = one_group(a, producer="/branch2/branch2.1/conv/Conv")
    assert dw is one_group(a, producer="/branch2/branch2.0/conv/Conv") and dw.size == 8 and dw.prunable


def test_se_expand_conv_joins_feature_group(analysis_of):
    a = analysis_of("SEBlock")
    feat = one_group(a, producer="/features/conv/Conv")
    assert feat is one_group(a, producer="/fc2/Conv")
    assert feat.size == 16
    assert {out_of(a, "/pool/GlobalAveragePool"), out_of(a, "/fc2/Conv"), out_of(a, "/Sigmoid"), "output"} <= set(feat.tensors)
    assert sorted(feat.sources) == sorted(["gamma:features.bn.weight", "weight:features.conv.weight", "weight:fc2.weight"])
    assert feat.pin_reasons == [OUT_PIN]
    squeeze = one_group(a, producer="/fc1/Conv")
    assert squeeze.size == 4 and squeeze.prunable and squeeze.consumers == ["/fc2/Conv"]
    assert squeeze.sources == ["weight:fc1.weight"]


def test_flatten_gemm_contiguous_blocks(analysis_of):
    a = analysis_of("FlattenHead")
    flat, relu = out_of(a, "/Flatten"), out_of(a, "/features/act/Relu")
    assert a.graph.tensors[flat].shape == (1, 8 * 8 * 8)
    c_flat, c_relu = a.graph.classes(flat), a.graph.classes(relu)
    assert c_flat.size == 8 * 8 * 8
    for c in range(8):
        assert set(c_flat[c * 64:(c + 1) * 64].tolist()) == {int(c_relu[c])}
    assert len(set(c_relu.tolist())) == 8
    g = one_group(a, producer="/features/conv/Conv")
    assert g.size == 8 and g.tensors[flat] == 512 and g.prunable
    assert g.consumers == ["/fc/Gemm"]
    head = one_group(a, producer="/fc/Gemm")
    assert head.tensors == {"output": 10} and head.pin_reasons == [OUT_PIN]


def test_transformer_mlp_prunable_residual_pinned(analysis_of):
    a = analysis_of("TransformerBlock")
    mlp = one_group(a, producer="/fc1/MatMul")
    assert mlp.size == 32 and mlp.prunable and mlp.pin_reasons == []
    assert mlp.consumers == ["/fc2/MatMul"] and mlp.sources == ["weight:fc1.weight"]
    assert set(mlp.tensors) == {"/fc1/MatMul_output_0", "/fc1/Add_output_0", "/act/Gelu_output_0"}
    res = one_group(a, tensor="input")
    assert res is one_group(a, tensor="output")
    assert res is one_group(a, producer="/out_proj/MatMul") is one_group(a, producer="/fc2/MatMul")
    assert res.size == 16 and not res.prunable
    assert IN_PIN in res.pin_reasons and OUT_PIN in res.pin_reasons
    ln = [r for r in res.pin_reasons if "LayerNormalization" in r]
    assert ln == [
        "LayerNormalization node '/ln1/LayerNormalization' normalizes over these channels",
        "LayerNormalization node '/ln2/LayerNormalization' normalizes over these channels",
    ]
    assert set(res.consumers) == {"/q_proj/MatMul", "/k_proj/MatMul", "/v_proj/MatMul", "/fc1/MatMul"}


def test_conv_transpose_groups(analysis_of):
    a = analysis_of("ConvTransposeNet")
    up = one_group(a, producer="/up/ConvTranspose")
    assert up.size == 4 and up.prunable
    assert sorted(up.sources) == ["gamma:up_bn.weight", "weight:up.weight"]
    assert up.consumers == ["/head/Conv"]
    down = one_group(a, producer="/down/conv/Conv")
    assert down.size == 8 and down.consumers == ["/up/ConvTranspose"]


def test_unknown_op_pins(analysis_of):
    a = analysis_of("UnknownOpNet")
    assert a.unknown_ops == {"CumSum": ["/CumSum"]}
    reason = "unknown op CumSum at node '/CumSum'"
    before = one_group(a, producer="/features/conv/Conv")
    after = one_group(a, tensor=out_of(a, "/CumSum"))
    assert before is not after
    for g in (before, after):
        assert g.pin_reasons == [reason] and not g.prunable
        assert "CumSum" in g.pin_reasons[0] and "/CumSum" in g.pin_reasons[0]
    assert after.consumers == ["/head/Conv"]
    head = one_group(a, producer="/head/Conv")
    assert head.pin_reasons == [OUT_PIN]


def test_graph_input_pins(analysis_of):
    for name in ("ConvStack", "InceptionBlock", "ConvTransposeNet"):
        a = analysis_of(name)
        g = one_group(a, tensor="input")
        assert g.pin_reasons == [IN_PIN] and g.size == 3 and g.tensors == {"input": 3}


# --------------------------------------------------------------------------- #
# Effective cost: dead channels from zeroed gammas
# --------------------------------------------------------------------------- #


def _alive(a, **kw):
    g = one_group(a, **kw)
    return g.alive, g.size


def _check_effective(a, expected: dict[str, tuple[int, float]]):
    """expected: node -> (flops, params) under the dead channels; other nodes keep their full cost
    (bilinear ops) or are checked via the listed entries."""
    got = {o.node: (o.flops, o.params) for o in a.ops}
    for node, value in expected.items():
        assert got[node] == pytest.approx(value, rel=1e-12), node
    assert a.effective.flops == sum(f for f, _ in got.values())


def test_effective_conv_stack(analysis_of):
    a = analysis_of("ConvStack-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/conv1/Conv") == (6, 8)
    assert _alive(a, producer="/conv2/Conv") == (13, 16)
    assert _alive(a, producer="/conv3/Conv") == (16, 16)
    expected = {
        "/conv1/Conv": (2 * 16 * 16 * 9 * 3 * 6, 9 * 3 * 6),
        "/bn1/BatchNormalization": (0, 2 * 6),
        "/conv2/Conv": (2 * 8 * 8 * 9 * 6 * 13, 9 * 6 * 13),
        "/bn2/BatchNormalization": (0, 2 * 13),
        "/conv3/Conv": (2 * 8 * 8 * 13 * 16, 13 * 16 + 16),
    }
    _check_effective(a, expected)
    assert a.effective.flops == 2 * 16 * 16 * 9 * 3 * 6 + 2 * 8 * 8 * 9 * 6 * 13 + 2 * 8 * 8 * 13 * 16
    assert a.effective.params == 162 + 12 + 702 + 26 + 224
    assert a.total.flops == 290816  # unchanged by the threshold
    c2 = op(a, "/conv2/Conv")
    assert (c2.in_alive, c2.in_total, c2.out_alive, c2.out_total, c2.activations) == (6, 8, 13, 16, 13)
    # without a threshold nothing dies even though gammas are zero
    plain = analysis_of("ConvStack-dead")
    assert plain.effective.flops == plain.total.flops == 290816


def test_effective_basic_block_pinned_residual_survives(analysis_of):
    a = analysis_of("BasicBlock-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/conv1/Conv") == (12, 16)
    assert _alive(a, producer="/conv2/Conv") == (16, 16)  # pinned by the graph output
    assert _alive(a, producer="/stem/conv/Conv") == (8, 8)
    _check_effective(a, {
        "/conv1/Conv": (2 * 8 * 8 * 9 * 8 * 12, 9 * 8 * 12),
        "/bn1/BatchNormalization": (0, 2 * 12),
        "/conv2/Conv": (2 * 8 * 8 * 9 * 12 * 16, 9 * 12 * 16),
        "/downsample/downsample.0/Conv": (2 * 8 * 8 * 8 * 16, 8 * 16),
    })
    assert a.effective.flops == 110592 + 2 * 8 * 8 * 9 * 8 * 12 + 2 * 8 * 8 * 9 * 12 * 16 + 16384


def test_effective_resnext_whole_conv_group_dies(analysis_of):
    a = analysis_of("ResNeXtBlock-dead", gamma_threshold=THRESHOLD)
    g = one_group(a, producer="/conv2/Conv")
    assert (g.alive, g.size) == (3, 4)  # only conv-group 1 (channels 4..7) is dead
    # conv2: 3 alive conv-groups, each 4 inputs x 4 outputs
    _check_effective(a, {
        "/conv1/Conv": (2 * 16 * 16 * 16 * 12, 16 * 12),
        "/bn1/BatchNormalization": (0, 2 * 12),
        "/conv2/Conv": (2 * 16 * 16 * 9 * (3 * 4 * 4), 9 * 3 * 4 * 4),
        "/bn2/BatchNormalization": (0, 2 * 12),
        "/conv3/Conv": (2 * 16 * 16 * 12 * 16, 12 * 16),
    })
    assert a.effective.flops == 221184 + 2 * 256 * 16 * 12 + 2 * 256 * 9 * 48 + 2 * 256 * 12 * 16


def test_effective_depthwise_multiplier(analysis_of):
    a = analysis_of("InvertedResidual-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/stem/conv/Conv") == (7, 8)  # class 3 dead, class 5 alive
    assert _alive(a, producer="/block1/expand/conv/Conv") == (18, 24)  # 0..5 dead, 10 alive
    cls8 = a.graph.classes(out_of(a, "/block1/Add"))
    # 7 of 8 input classes alive; dw output has 2 channels per class -> 14 of 16
    _check_effective(a, {
        "/stem/conv/Conv": (2 * 16 * 16 * 9 * 3 * 7, 9 * 3 * 7),
        "/stem/bn/BatchNormalization": (0, 2 * 7),
        "/block1/expand/conv/Conv": (2 * 16 * 16 * 7 * 18, 7 * 18),
        "/block1/expand/bn/BatchNormalization": (0, 2 * 18),
        "/block1/dw/conv/Conv": (2 * 16 * 16 * 9 * 1 * 18, 9 * 18),
        "/block1/dw/bn/BatchNormalization": (0, 2 * 18),
        "/block1/project/conv/Conv": (2 * 16 * 16 * 18 * 7, 18 * 7),
        "/block1/project/bn/BatchNormalization": (0, 2 * 7),
        "/block2/dw/conv/Conv": (2 * 8 * 8 * 9 * 1 * 14, 9 * 14),
        "/block2/dw/bn/BatchNormalization": (0, 2 * 14),
        "/block2/project/conv/Conv": (2 * 8 * 8 * 14 * 16, 14 * 16),
        "/block2/project/bn/BatchNormalization": (0, 2 * 16),
    })
    dw = op(a, "/block2/dw/conv/Conv")
    assert (dw.in_alive, dw.out_alive) == (7, 14)
    assert len(set(cls8.tolist())) == 8


def test_effective_densenet_max_over_gammas(analysis_of):
    a = analysis_of("DenseBlock-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/stem/Conv") == (7, 8)  # 2 dead; 6 kept by head.bn
    assert _alive(a, producer="/layer1/conv/Conv") == (3, 4)
    assert _alive(a, producer="/layer2/conv/Conv") == (3, 4)
    _check_effective(a, {
        "/stem/Conv": (2 * 16 * 16 * 9 * 3 * 7, 9 * 3 * 7),
        "/layer1/bn/BatchNormalization": (0, 2 * 7),
        "/layer1/conv/Conv": (2 * 16 * 16 * 9 * 7 * 3, 9 * 7 * 3),
        "/layer2/bn/BatchNormalization": (0, 2 * (7 + 3)),
        "/layer2/conv/Conv": (2 * 16 * 16 * 9 * (7 + 3) * 3, 9 * 10 * 3),
        "/head/bn/BatchNormalization": (0, 2 * (7 + 3 + 3)),
        "/head/conv/Conv": (2 * 16 * 16 * 1 * 13 * 16, 13 * 16),
    })
    assert a.effective.params == 189 + 14 + 189 + 20 + 270 + 26 + 208


def test_effective_inception(analysis_of):
    a = analysis_of("InceptionBlock-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/stem/conv/Conv") == (7, 8)
    assert _alive(a, producer="/branch2/branch2.0/conv/Conv") == (3, 4)
    assert _alive(a, producer="/branch3/branch3.0/conv/Conv") == (1, 2)
    assert _alive(a, producer="/branch1/conv/Conv") == (4, 4)  # pinned
    _check_effective(a, {
        "/stem/conv/Conv": (2 * 256 * 9 * 3 * 7, 9 * 3 * 7),
        "/branch1/conv/Conv": (2 * 256 * 7 * 4, 7 * 4),
        "/branch2/branch2.0/conv/Conv": (2 * 256 * 7 * 3, 7 * 3),
        "/branch2/branch2.1/conv/Conv": (2 * 256 * 9 * 3 * 4, 9 * 3 * 4),
        "/branch3/branch3.0/conv/Conv": (2 * 256 * 7 * 1, 7 * 1),
        "/branch3/branch3.1/conv/Conv": (2 * 256 * 25 * 1 * 4, 25 * 1 * 4),
        "/branch4/branch4.1/conv/Conv": (2 * 256 * 7 * 4, 7 * 4),
    })
    assert a.effective.flops == 2 * 256 * (27 * 7 + 28 + 21 + 108 + 7 + 100 + 28)
    mp = op(a, "/branch4/branch4.0/MaxPool")
    assert (mp.in_alive, mp.in_total) == (7, 8)


def test_effective_split_group_sources(analysis_of):
    a = analysis_of("SplitBlock-dead", gamma_threshold=THRESHOLD)
    stems = groups_with(a, producer="/stem/conv/Conv")
    assert [(g.alive, g.size) for g in stems] == [(4, 4), (3, 4), (7, 8)]
    _check_effective(a, {
        "/stem/conv/Conv": (2 * 256 * 27 * 14, 27 * 14),
        "/stem/bn/BatchNormalization": (0, 2 * 14),
        "/chunk_a/conv/Conv": (2 * 256 * 9 * 7 * 8, 9 * 7 * 8),
        "/chunk_b/conv/Conv": (2 * 256 * 9 * 7 * 8, 9 * 7 * 8),
        "/split_c/conv/Conv": (2 * 256 * 4 * 4, 4 * 4),
        "/split_d/conv/Conv": (2 * 256 * 10 * 12, 10 * 12),
    })


def test_effective_shufflenet(analysis_of):
    a = analysis_of("ShuffleUnit-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, tensor=out_of(a, "/Slice")) == (8, 8)  # reaches the output: pinned
    assert _alive(a, tensor=out_of(a, "/Slice_1")) == (7, 8)
    assert _alive(a, producer="/branch2/branch2.0/conv/Conv") == (7, 8)  # 5 dead, 2 kept by dw BN
    _check_effective(a, {
        "/stem/conv/Conv": (2 * 256 * 27 * 15, 27 * 15),
        "/branch2/branch2.0/conv/Conv": (2 * 256 * 7 * 7, 7 * 7),
        "/branch2/branch2.1/conv/Conv": (2 * 256 * 9 * 1 * 7, 9 * 7),
        "/branch2/branch2.2/conv/Conv": (2 * 256 * 7 * 8, 7 * 8),
    })


def test_effective_flatten_gemm(analysis_of):
    a = analysis_of("FlattenHead-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/features/conv/Conv") == (6, 8)
    _check_effective(a, {
        "/features/conv/Conv": (2 * 8 * 8 * 27 * 6, 27 * 6),
        "/features/bn/BatchNormalization": (0, 2 * 6),
        "/fc/Gemm": (2 * (6 * 64) * 10, 6 * 64 * 10 + 10),
    })
    gemm = op(a, "/fc/Gemm")
    assert (gemm.in_alive, gemm.in_total) == (6 * 64, 512)


def test_effective_conv_transpose(analysis_of):
    a = analysis_of("ConvTransposeNet-dead", gamma_threshold=THRESHOLD)
    _check_effective(a, {
        "/down/conv/Conv": (2 * 8 * 8 * 27 * 7, 27 * 7),
        "/up/ConvTranspose": (2 * 8 * 8 * 2 * 2 * 7 * 3, 7 * 3 * 2 * 2),
        "/up_bn/BatchNormalization": (0, 2 * 3),
        "/head/Conv": (2 * 16 * 16 * 9 * 3 * 3, 9 * 3 * 3 + 3),
    })


def test_effective_unknown_op_keeps_pinned_channels(analysis_of):
    a = analysis_of("UnknownOpNet-dead", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/features/conv/Conv") == (8, 8)
    assert a.effective == a.total


def test_effective_weight_threshold_through_transposed_weights(analysis_of):
    # fc1.weight rows 3, 4 zero: hidden units 3, 4 die; the weight reaches MatMul via Transpose
    a = analysis_of("TransformerBlock-deadfc1", weight_threshold=THRESHOLD)
    assert _alive(a, producer="/fc1/MatMul") == (30, 32)
    _check_effective(a, {
        "/fc1/MatMul": (2 * 6 * 16 * 30, 16 * 30),
        "/fc1/Add": (0, 30),
        "/fc2/MatMul": (2 * 6 * 30 * 16, 30 * 16),
        "/fc2/Add": (0, 16),
    })
    assert a.effective.flops == 26880 - 2 * (2 * 6 * 16 * 2)
    # SE squeeze channels 1 (zero) and 2 (RMS 5e-4) of fc1 die by their weight slices
    s = analysis_of("SEBlock-deadfc1", weight_threshold=THRESHOLD)
    assert _alive(s, producer="/fc1/Conv") == (2, 4)
    _check_effective(s, {
        "/fc1/Conv": (2 * 16 * 2, 16 * 2 + 2),
        "/fc2/Conv": (2 * 2 * 16, 2 * 16 + 16),
    })


def test_effective_uses_absolute_gamma(analysis_of):
    a = analysis_of("ConvStack-neg", gamma_threshold=THRESHOLD)
    assert _alive(a, producer="/conv1/Conv") == (7, 8)
    _check_effective(a, {
        "/conv1/Conv": (2 * 16 * 16 * 9 * 3 * 7, 9 * 3 * 7),
        "/conv2/Conv": (2 * 8 * 8 * 9 * 7 * 16, 9 * 7 * 16),
    })


# --------------------------------------------------------------------------- #
# Latency (roofline)
# --------------------------------------------------------------------------- #


def test_latency_v100_one_conv(analysis_of):
    a = analysis_of("ConvStack-dead", gamma_threshold=THRESHOLD, cost="latency:V100")
    assert a.cost == "latency" and a.hardware.name == "V100"
    c2 = op(a, "/conv2/Conv")
    flops = 2 * 8 * 8 * 9 * 6 * 13
    # input [1,8,16,16] with 6/8 alive, output [1,16,8,8] with 13/16 alive, weight 9*6*13
    bytes_ = 4 * (8 * 16 * 16 * 6 / 8 + 16 * 8 * 8 * 13 / 16 + 9 * 6 * 13)
    assert c2.flops == flops
    assert c2.memory_bytes == pytest.approx(bytes_, rel=1e-12)
    assert c2.latency_s == pytest.approx(max(flops / 125000e9, bytes_ / 900e9), rel=1e-12)
    assert c2.latency_s == pytest.approx(bytes_ / 900e9, rel=1e-12)  # memory bound on V100
    assert a.effective.latency_s == pytest.approx(sum(o.latency_s for o in a.ops), rel=1e-12)
    # all-alive totals: conv2 reads 8 x 16x16 and writes 16 x 8x8, weight 9*8*16
    full_bytes = 4 * (8 * 16 * 16 + 16 * 8 * 8 + 9 * 8 * 16)
    assert a.total.memory_bytes > a.effective.memory_bytes
    plain = analysis_of("ConvStack", cost="latency:V100")
    assert op(plain, "/conv2/Conv").memory_bytes == full_bytes
    assert op(plain, "/conv2/Conv").latency_s == pytest.approx(full_bytes / 900e9, rel=1e-12)
    # compute bound on made-up hardware (1 GFLOP/s, 1000 GB/s); MACs do not change latency
    slow = analysis_of("ConvStack-dead", gamma_threshold=THRESHOLD, cost="latency:1,1000", macs=True)
    s2 = op(slow, "/conv2/Conv")
    assert s2.flops == flops / 2
    assert s2.latency_s == pytest.approx(flops / 1e9, rel=1e-12)


def test_attention_matmul_memory_reads_both_operands(analysis_of):
    a = analysis_of("TransformerBlock")
    qk = op(a, "/MatMul")  # q [1,2,6,8] @ k^T [1,2,8,6] -> [1,2,6,6]
    assert qk.memory_bytes == 4 * (1 * 2 * 6 * 8 + 1 * 2 * 8 * 6 + 1 * 2 * 6 * 6)
    av = op(a, "/MatMul_1")  # att [1,2,6,6] @ v [1,2,6,8] -> [1,2,6,8]
    assert av.memory_bytes == 4 * (1 * 2 * 6 * 6 + 1 * 2 * 6 * 8 + 1 * 2 * 6 * 8)
