"""Channels laid out over several axes by a reshape, pruned exactly.

- Linear -> Reshape to [N, C, H, W] -> (BatchNorm) -> Conv/ConvTranspose, the mirror of Flatten -> Gemm:
  conv channel c owns the block of H*W Linear features c*H*W .. (c+1)*H*W - 1.
- A fused projection viewed as [k, C] and split along k (unbind, chunk), its pieces combined
  elementwise (a * sigmoid(b)): features {j, C+j, 2C+j} are one channel.

Each model is exported from torch (random init), pruned with `prune --mask`, and compared in
onnxruntime with the torch module whose removed channels' weights are zeroed.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnx_morph
from onnx_morph.costs import op_costs, totals_of
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.surgery.select import mask_document
from onnx_morph.rewrite.surgery.verify import onnxruntime

REL_TOL = 1e-5


def _export(module: nn.Module, example: torch.Tensor, path) -> str:
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    return str(path)


def _prunable(analysis) -> list:
    return [g for g in analysis.graph.groups if g.prunable]


def _prune_and_compare(path: str, module: nn.Module, alive: np.ndarray, zero, example: torch.Tensor,
                       batch: int = 3) -> onnx.ModelProto:
    """Prune to `alive`, check the masked deviation, the predicted FLOPs, and the outputs against the
    torch module after `zero(module)` on fresh inputs (of another batch size, by default)."""
    analysis = onnx_morph.analyze(path)
    result = prune(path, Mask(mask_document(analysis.graph, alive)))
    assert result.removed_channels == int((~alive).sum()) > 0
    assert result.masked_deviation.max_rel < REL_TOL
    onnx.checker.check_model(result.model, full_check=True)
    assert onnx_morph.analyze(result.model).total.flops == totals_of(op_costs(analysis.graph, alive)).flops
    zero(module)
    inputs = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = module.eval()(inputs).numpy()
    session = onnxruntime().InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"input": inputs.numpy()})[0]
    assert np.abs(expected).max() > 0
    assert np.abs(expected - actual).max() / np.abs(expected).max() < REL_TOL
    return result.model


class LinearToConv(nn.Module):
    """A generator stem: Linear -> view(N, C, H, W) -> (BatchNorm -> ReLU) -> Conv or ConvTranspose."""

    def __init__(self, norm: bool, transposed: bool, channels: int = 6, side: int = 4, batched: bool = True):
        super().__init__()
        self.channels, self.side, self.batched = channels, side, batched
        self.fc = nn.Linear(8, channels * side * side)
        self.norm = nn.BatchNorm2d(channels) if norm else nn.Identity()
        self.conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(channels, 5, 3, padding=1)
        if norm:
            with torch.no_grad():
                for tensor in (self.norm.weight, self.norm.bias, self.norm.running_mean):
                    tensor.normal_()
                self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, z):
        if self.batched:
            x = self.fc(z).view(-1, self.channels, self.side, self.side)
        else:  # [C, H, W], batch 1
            x = self.fc(z).view(self.channels, self.side, self.side).unsqueeze(0)
        return self.conv(torch.relu(self.norm(x)))


@pytest.mark.parametrize("norm, transposed, batched", [
    (False, False, True), (True, False, True), (False, True, True), (True, True, True), (False, False, False)],
    ids=["conv", "batchnorm-conv", "convtranspose", "batchnorm-convtranspose", "chw-conv"])
def test_linear_reshaped_to_nchw_prunes_conv_channels(norm, transposed, batched, tmp_path):
    torch.manual_seed(0)
    module = LinearToConv(norm, transposed, batched=batched)
    example = torch.randn(2 if batched else 1, 8)
    path = _export(module, example, tmp_path / "stem.onnx")
    graph = onnx_morph.analyze(path).graph
    (group,) = _prunable(onnx_morph.analyze(path))
    assert group.size == module.channels  # one unit per conv channel, not per Linear feature
    features = graph.classes(graph.nodes[next(n for n in graph.nodes if "fc/Gemm" in n)].output[0])
    block = module.side * module.side
    assert all(np.unique(features[c * block:(c + 1) * block]).size == 1 for c in range(module.channels))

    dead = [1, 4]
    alive = np.ones(graph.num_classes, dtype=bool)
    alive[features[[c * block for c in dead]]] = False

    def zero(m):
        with torch.no_grad():
            for c in dead:
                m.fc.weight[c * block:(c + 1) * block] = 0
                m.fc.bias[c * block:(c + 1) * block] = 0
                m.conv.weight[(slice(None), c) if not transposed else c] = 0  # the conv reads nothing from c

    pruned = _prune_and_compare(path, module, alive, zero, example, batch=3 if batched else 1)
    shapes = [list(onnx.numpy_helper.to_array(t).shape) for t in pruned.graph.initializer]
    kept = module.channels - len(dead)
    assert [kept * block, 8] in shapes  # the Linear lost the two blocks of rows
    reshapes = [onnx.numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer
                if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1 and t.dims[0] == 3 + batched]
    assert ([-1] if batched else []) + [kept, module.side, module.side] in reshapes


class FusedGate(nn.Module):
    """One Linear(E, k*C) viewed as [k, C] and split along k, the pieces combined elementwise:
    unbind -> a * sigmoid(b) (k = 2), or chunk -> a * sigmoid(b) + c (k = 3)."""

    def __init__(self, pieces: int, dim: int = 8, width: int = 6, squeeze: bool = False):
        super().__init__()
        self.pieces, self.width, self.squeeze = pieces, width, squeeze
        self.up, self.down = nn.Linear(dim, pieces * width), nn.Linear(width, dim)

    def forward(self, x):
        b, t, _ = x.shape
        fused = self.up(x).reshape(b, t, self.pieces, self.width)
        if self.pieces == 2:
            a, g = fused.unbind(2)
            return self.down(a * torch.sigmoid(g))
        a, g, c = fused.chunk(3, dim=2)
        merged = a * torch.sigmoid(g) + c
        # squeeze(2) of a chunk exports as an If (the size is known only at run time); reshape does not
        return self.down(merged.squeeze(2) if self.squeeze else merged.reshape(b, t, self.width))


@pytest.mark.parametrize("pieces", [2, 3], ids=["unbind", "chunk"])
def test_fused_projection_split_along_k_prunes_whole_channels(pieces, tmp_path):
    torch.manual_seed(0)
    module = FusedGate(pieces)
    example = torch.randn(1, 5, 8)
    path = _export(module, example, tmp_path / "gate.onnx")
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    (group,) = _prunable(analysis)
    assert group.size == module.width  # channel j is the feature set {j, C+j, 2C+j}
    width = module.width
    features = graph.classes(graph.nodes[next(n for n in graph.nodes if "up/MatMul" in n)].output[0])
    for j in range(width):
        assert np.unique(features[j::width]).size == 1

    dead = [0, 3, 4]
    alive = np.ones(graph.num_classes, dtype=bool)
    alive[features[dead]] = False

    def zero(m):
        with torch.no_grad():
            rows = [j + p * width for j in dead for p in range(pieces)]
            m.up.weight[rows] = 0
            m.up.bias[rows] = 0

    pruned = _prune_and_compare(path, module, alive, zero, example)
    kept = width - len(dead)
    shapes = [list(onnx.numpy_helper.to_array(t).shape) for t in pruned.graph.initializer]
    assert [8, pieces * kept] in shapes and [kept, 8] in shapes


def test_channels_read_inside_an_if_branch_stay_pinned(tmp_path):
    """torch exports squeeze of a chunk as an If whose branches read the activation by name: the If
    is not a constant computation, and those channels are pinned with its name."""
    torch.manual_seed(0)
    path = _export(FusedGate(3, squeeze=True), torch.randn(1, 5, 8), tmp_path / "if.onnx")
    analysis = onnx_morph.analyze(path)
    assert not _prunable(analysis)
    gate = next(g for g in analysis.groups if any("/up/" in p for p in g.producers))
    assert gate.size == 6 and "If node '/If' reads it inside a subgraph" in gate.pin_reasons
