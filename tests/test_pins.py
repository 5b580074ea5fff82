"""Patterns that are prunable exactly, and those that stay pinned with a reason naming the op.

Each model is built here (random init, batch 1) and goes through the sweep's check
(tools/sweep_models.py `check_architecture`): a seeded random 30% of every prunable group's channels is
removed with `prune --mask`, and the result must pass the ONNX checker, cost what the cost model
predicted, and match the original with those channels zeroed, in onnxruntime on fresh inputs, to 1e-4.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import onnx_morph
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.surgery.select import mask_document

from tools import sweep_models

from tools import zoo

IMAGE = (1, 3, 10, 10)


def conv_bn(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.BatchNorm2d(c_out), nn.ReLU())


def checked(module: nn.Module, shape, tmp_path: Path, name: str) -> tuple[onnx_morph.Analysis, sweep_models.Row]:
    """Export, analyze and run the sweep's prune-and-compare check; the row holds the deviation."""
    torch.manual_seed(0)
    zoo._randomize_bn(module)
    path = zoo.export_onnx(module.eval(), shape, tmp_path / f"{name}.onnx")
    row = sweep_models.check_architecture(name, path, sweep_models.Row(name))
    return onnx_morph.analyze(path), row


def group_of(analysis, op_type: str):
    """The group whose ops include a node of `op_type`."""
    return next(g for g in analysis.groups if any(op.startswith(op_type) or f"/{op_type}" in op for op in g.ops))


# --------------------------------------------------------------------------- #
# Sums over the channel axis
# --------------------------------------------------------------------------- #


class L2Normalize(nn.Module):
    """F.normalize over channels: x / max(||x||, eps) broadcast back by Expand."""

    def __init__(self):
        super().__init__()
        self.body, self.head = conv_bn(3, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.normalize(self.body(x), dim=1))


class ChannelSums(nn.Module):
    """ReduceSum, ReduceSumSquare, ReduceL1 and ReduceL2 over the channels, each feeding the head."""

    def __init__(self):
        super().__init__()
        self.body, self.head = conv_bn(3, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.body(x)
        energy = h.sum(1, keepdim=True) + (h * h).sum(1, keepdim=True) + h.abs().sum(1, keepdim=True)
        return self.head(h / (h.norm(dim=1, keepdim=True) + 1e-3)) * energy  # ReLU may zero a whole position


@pytest.mark.parametrize("module", [L2Normalize, ChannelSums], ids=lambda m: m.__name__)
def test_sums_over_channels_are_prunable(module, tmp_path):
    analysis, row = checked(module(), IMAGE, tmp_path, module.__name__)
    hidden = next(g for g in analysis.groups if g.size == 8)
    assert hidden.prunable, hidden.pin_reasons
    assert row.removed_channels >= 2 and row.max_rel < 1e-4


class MeanAndMax(nn.Module):
    """CBAM's spatial attention input: the mean and the max over channels."""

    def __init__(self):
        super().__init__()
        self.body, self.gate, self.head = conv_bn(3, 8), nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.body(x)
        pooled = torch.cat([h.mean(1, keepdim=True), h.amax(1, keepdim=True)], 1)
        return self.head(h * torch.sigmoid(self.gate(pooled)))


def test_mean_and_max_over_channels_stay_pinned(tmp_path):
    torch.manual_seed(0)
    path = zoo.export_onnx(MeanAndMax(), IMAGE, tmp_path / "cbam.onnx")
    hidden = next(g for g in onnx_morph.analyze(path).groups if g.size == 8)
    assert not hidden.prunable
    reasons = " ".join(hidden.pin_reasons)
    assert "ReduceMean node" in reasons and "divisor" in reasons
    assert "ReduceMax node" in reasons and "maximum" in reasons


def conv_model(path: Path, middle: list, hidden: int, head_in: int, shape=IMAGE, out_side: int | None = None,
               opset: int = 13) -> Path:
    """input -> Conv(3 -> hidden, 3x3, padded) named h -> `middle` nodes ending in 'mid' -> 1x1 Conv(head_in -> 4)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), name)
             for name, s in (("w", (hidden, 3, 3, 3)), ("b", (hidden,)), ("head", (4, head_in, 1, 1)))]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["h"], pads=[1, 1, 1, 1]), *middle,
             helper.make_node("Conv", ["mid", "head"], ["output"])]
    side = out_side or shape[2]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, (1, 4, side, side))], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_every_zero_neutral_reduction_is_prunable(tmp_path):
    """ReduceSumSquare, ReduceL1 and ReduceLogSum (which torch does not emit) over the channels of a
    conv, each scaling the conv's output on its way to the head."""
    nodes, scaled = [helper.make_node("Abs", ["h"], ["h_abs"])], "h"
    for op in ("ReduceSumSquare", "ReduceL1", "ReduceLogSum"):
        nodes += [helper.make_node(op, ["h" if op != "ReduceLogSum" else "h_abs"], [f"{op}_out"], axes=[1], keepdims=1),
                  helper.make_node("Mul", [scaled, f"{op}_out"], [f"{op}_scaled"])]
        scaled = f"{op}_scaled"
    path = conv_model(tmp_path / "sums.onnx", [*nodes, helper.make_node("Identity", [scaled], ["mid"])], 8, 8)

    hidden = next(g for g in onnx_morph.analyze(path).groups if g.size == 8)
    assert hidden.prunable, hidden.pin_reasons
    row = sweep_models.check_architecture("sums", path, sweep_models.Row("sums"))
    assert row.removed_channels == 2 and row.max_rel < 1e-4


# --------------------------------------------------------------------------- #
# Pixel shuffle
# --------------------------------------------------------------------------- #


class PixelShuffle(nn.Module):
    """torch's PixelShuffle exports as DepthToSpace in CRD mode."""

    def __init__(self):
        super().__init__()
        self.body, self.shuffle, self.head = conv_bn(3, 16), nn.PixelShuffle(2), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.shuffle(self.body(x)))


def test_torch_pixel_shuffle_prunes_whole_blocks(tmp_path):
    analysis, row = checked(PixelShuffle(), IMAGE, tmp_path, "PixelShuffle")
    group = next(g for g in analysis.groups if g.size == 4 and g.prunable)
    assert group.tensors[next(t for t in group.tensors if "body.0" in t)] == 16  # 4 channels of 4 sub-pixels
    assert row.removed_channels == 1 and row.max_rel < 1e-4


@pytest.mark.parametrize("op, mode", [("DepthToSpace", "DCR"), ("DepthToSpace", "CRD"), ("SpaceToDepth", None)])
def test_depth_to_space_and_back_prune_in_blocks(op, mode, tmp_path):
    attrs = {"blocksize": 2, **({"mode": mode} if mode else {})}
    if op == "DepthToSpace":  # 16 channels of 10x10 -> 4 channels of 20x20
        path = conv_model(tmp_path / "d2s.onnx", [helper.make_node(op, ["h"], ["mid"], **attrs)], 16, 4, out_side=20)
    else:  # 4 channels of 10x10 -> 16 channels of 5x5
        path = conv_model(tmp_path / "s2d.onnx", [helper.make_node(op, ["h"], ["mid"], **attrs)], 4, 16, out_side=5)
    groups = [g for g in onnx_morph.analyze(path).groups if g.prunable]
    assert [g.size for g in groups] == [4]
    row = sweep_models.check_architecture(op, path, sweep_models.Row(op))
    assert row.removed_channels == 1 and row.max_rel < 1e-4


# --------------------------------------------------------------------------- #
# GroupNorm
# --------------------------------------------------------------------------- #


class GroupNormNet(nn.Module):
    """torch's GroupNorm exports as Reshape [N, G, -1] -> InstanceNormalization -> Reshape -> Mul -> Add."""

    def __init__(self):
        super().__init__()
        self.body, self.norm, self.head = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(4, 12), nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.body(x))))


def test_exported_group_norm_prunes_whole_groups(tmp_path):
    analysis, row = checked(GroupNormNet(), IMAGE, tmp_path, "GroupNormNet")
    group = next(g for g in analysis.groups if g.prunable)
    assert group.size == 4 and group.tensors["/body/Conv_output_0"] == 12  # 4 groups of 3 channels
    assert group.sources == ["weight:body.weight"]  # InstanceNormalization's Constant ones are no gamma
    assert row.removed_channels == 1 and row.max_rel < 1e-4


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_op_prunes_whole_groups(opset, tmp_path):
    """The GroupNormalization op: scale and shift per group at opset 18, per channel at 21."""
    rng = np.random.default_rng(1)
    size = 4 if opset == 18 else 12
    scale = [numpy_helper.from_array(rng.standard_normal(size).astype(np.float32), n) for n in ("gn_scale", "gn_bias")]
    middle = [helper.make_node("GroupNormalization", ["h", "gn_scale", "gn_bias"], ["mid"], num_groups=4)]
    path = conv_model(tmp_path / "gn.onnx", middle, 12, 12, opset=opset)
    model = onnx.load(str(path))
    model.graph.initializer.extend(scale)
    onnx.save(model, str(path))

    analysis = onnx_morph.analyze(path)
    assert [g.size for g in analysis.groups if g.prunable] == [4]
    row = sweep_models.check_architecture("gn", path, sweep_models.Row("gn"))
    assert row.removed_channels == 1 and row.max_rel < 1e-4
    pruned = prune(path, Mask(mask_document(analysis.graph, sweep_models.random_kill(analysis.graph, 0)))).model
    node = next(n for n in pruned.graph.node if n.op_type == "GroupNormalization")
    assert helper.get_attribute_value(node.attribute[0]) == 3


def test_instance_norm_over_channel_positions_is_pinned(tmp_path):
    """InstanceNormalization of [N, 4, 2, H*W] made from [N, 8, H, W]: axis 2 holds channels it normalizes over."""
    shape = numpy_helper.from_array(np.array([1, 4, 2, 100], dtype=np.int64), "split")
    back = numpy_helper.from_array(np.array([1, 8, 10, 10], dtype=np.int64), "back")
    ones = numpy_helper.from_array(np.ones(4, dtype=np.float32), "ones")
    zeros = numpy_helper.from_array(np.zeros(4, dtype=np.float32), "zeros")
    middle = [helper.make_node("Reshape", ["h", "split"], ["grid"]),
              helper.make_node("InstanceNormalization", ["grid", "ones", "zeros"], ["normed"]),
              helper.make_node("Reshape", ["normed", "back"], ["mid"])]
    path = conv_model(tmp_path / "in.onnx", middle, 8, 8)
    model = onnx.load(str(path))
    model.graph.initializer.extend([shape, back, ones, zeros])
    onnx.save(model, str(path))
    hidden = next(g for g in onnx_morph.analyze(path).groups if g.size == 8)
    assert not hidden.prunable
    assert any("InstanceNormalization node" in r and "normalizes over channels on axes [2]" in r for r in hidden.pin_reasons)


# --------------------------------------------------------------------------- #
# LSTM, GRU, RNN
# --------------------------------------------------------------------------- #


class Recurrent(nn.Module):
    """Linear -> ReLU -> recurrent layer (batch first) -> Linear: the Linear's width is the input features."""

    def __init__(self, cell: type, features: int = 8, hidden: int = 5):
        super().__init__()
        self.lin, self.rnn, self.out = nn.Linear(6, features), cell(features, hidden, batch_first=True), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.out(self.rnn(torch.relu(self.lin(x)))[0])


def export_folded(module: nn.Module, shape, path: Path, fold: bool) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), dynamo=False, do_constant_folding=fold)
    return path


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_recurrent_input_features_are_prunable(cell, tmp_path):
    torch.manual_seed(0)
    module = Recurrent(cell, features=16, hidden=12)
    path = export_folded(module, (1, 7, 6), tmp_path / "rnn.onnx", fold=True)
    analysis = onnx_morph.analyze(path)
    assert [g.size for g in analysis.groups if g.prunable] == [16]
    hidden = [g for g in analysis.groups if g.size == 12]
    assert hidden and all(any(f"{cell.__name__} node" in r and "hidden size" in r for r in g.pin_reasons) for g in hidden)
    assert analysis.total.params == sum(p.numel() for p in module.parameters())
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cell]
    assert analysis.total.flops == 2 * 7 * (6 * 16 + gates * 16 * 12 + gates * 12 * 12 + 12 * 3)
    row = sweep_models.check_architecture(cell.__name__, path, sweep_models.Row(cell.__name__))
    assert row.removed_channels == 5 and row.max_rel < 1e-4


def test_recurrent_weight_computed_at_run_time_is_pinned(tmp_path):
    """Without constant folding torch computes W from weight_ih (gate reordering): surgery cannot slice it."""
    torch.manual_seed(0)
    module = Recurrent(nn.LSTM, features=48, hidden=32)
    analysis = onnx_morph.analyze(export_folded(module, (1, 7, 6), tmp_path / "lstm.onnx", fold=False))
    features = next(g for g in analysis.groups if g.size == 48)
    assert any("computed at run time" in r and "do_constant_folding=True" in r for r in features.pin_reasons)
    assert analysis.total.params == sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- #
# Attention across branches
# --------------------------------------------------------------------------- #


class SelectiveKernel(nn.Module):
    """timm's SelectiveKernel: conv paths stacked to [B, paths, C, H, W], their sum pooled, and a
    softmax over the paths of a [B, paths, C] attention weighting each path before summing them."""

    def __init__(self, channels=8, paths=2, attention=4):
        super().__init__()
        self.stem = conv_bn(3, channels)
        self.paths = nn.ModuleList([nn.Sequential(nn.Conv2d(channels, channels, 3, padding=d, dilation=d),
                                                  nn.BatchNorm2d(channels), nn.ReLU()) for d in range(1, paths + 1)])
        self.reduce = nn.Sequential(nn.Conv2d(channels, attention, 1), nn.BatchNorm2d(attention), nn.ReLU())
        self.select, self.head = nn.Conv2d(attention, channels * paths, 1), nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        stacked = torch.stack([path(x) for path in self.paths], 1)
        b, p, c = stacked.shape[:3]
        attention = self.select(self.reduce(stacked.sum(1).mean((2, 3), keepdim=True)))
        return self.head((stacked * attention.view(b, p, c, 1, 1).softmax(1)).sum(1))


def test_selective_kernel_prunes_the_branch_width(tmp_path):
    analysis, row = checked(SelectiveKernel(), IMAGE, tmp_path, "SelectiveKernel")
    branch = next(g for g in analysis.groups if "/select/Conv_output_0" in g.tensors)
    assert branch.prunable and branch.size == 8
    assert branch.tensors["/select/Conv_output_0"] == 16  # channel c of both paths' attention
    assert sum(t.startswith("/paths.") for t in branch.tensors) == 6  # both paths' conv, BN, ReLU
    assert row.max_rel < 1e-4 and row.removed_channels == 2 + 2 + 1


def test_softmax_over_all_channels_stays_pinned(tmp_path):
    torch.manual_seed(0)

    class ChannelSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = conv_bn(3, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.body(x).softmax(1))

    path = zoo.export_onnx(ChannelSoftmax(), IMAGE, tmp_path / "softmax.onnx")
    hidden = next(g for g in onnx_morph.analyze(path).groups if g.size == 8)
    assert not hidden.prunable and any("Softmax node" in r for r in hidden.pin_reasons)


def test_broadcast_norm_read_by_a_conv_is_pinned(tmp_path):
    """The norm broadcast back over the channels is copies of one value: dividing by it prunes, a conv
    summing it over channels does not (removing a copy drops its contribution, zeroing x does not)."""

    class NormToConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.side = conv_bn(3, 8), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.body(x)
            norm = h.norm(dim=1, keepdim=True).expand_as(h)
            return self.head(h / norm) + self.side(norm)

    torch.manual_seed(0)
    path = zoo.export_onnx(NormToConv(), IMAGE, tmp_path / "norm_conv.onnx")
    hidden = next(g for g in onnx_morph.analyze(path).groups if g.size == 8)
    assert not hidden.prunable
    assert any("Conv node" in r and "copies of one value" in r for r in hidden.pin_reasons)
