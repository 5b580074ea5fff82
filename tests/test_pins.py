"""Patterns that are prunable exactly, and those that stay pinned with a reason naming the op.

Each model is built here (random init, batch 1) and goes through the sweep's check
(tools/sweep_models.py `check_architecture`): a seeded random 30% of every prunable group's channels is
removed with `prune --mask`, and the result must pass the ONNX checker, cost what the cost model
predicted, and match the original with those channels zeroed, in onnxruntime on fresh inputs, to 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import onnx_morph

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import sweep_models  # noqa: E402

try:
    import zoo
except ImportError:  # tests/ turned into a package
    from tests import zoo

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
