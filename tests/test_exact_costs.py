"""Parameters equal `sum(p.numel() for p in module.parameters())` when trained tensors reach the
computation through constant subgraphs: position tables gathered by constant ids, class tokens
broadcast by Expand, scales reshaped or unsqueezed onto the channel axis (GroupNorm, layer scale),
relative position bias tables gathered by constant indices, and weights computed from parameters
(weight norm, weight standardization). A conv on a constant input (a Fourier position encoding) counts
its weights, not its fixed input grid, and no FLOPs: runtimes fold it at load time.

Every model is built in the test (random init) and exported with the TorchScript exporter, with and
without constant folding (torch folds some subgraphs into new initializers of the same size).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

import onnx_morph
from onnx_morph.costs.terms import cost_terms
from onnx_morph.costs import marginal_cost

TOKENS, DIM = 6, 8


class PositionTable(nn.Module):
    """BERT-style: a position embedding indexed by a constant arange buffer, added to the tokens."""

    def __init__(self):
        super().__init__()
        self.lin, self.pos, self.out = nn.Linear(DIM, DIM), nn.Embedding(TOKENS, DIM), nn.Linear(DIM, 4)
        self.register_buffer("ids", torch.arange(TOKENS))

    def forward(self, x):
        return self.out(torch.relu(self.lin(x) + self.pos(self.ids)))


class ClassToken(nn.Module):
    """ViT-style: a learned token broadcast over the batch and joined to the patch tokens."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(DIM, DIM), nn.Linear(DIM, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))

    def forward(self, x):
        return self.out(torch.cat([self.cls.expand(x.shape[0], -1, -1), self.lin(x)], 1))


class GroupNormNet(nn.Module):
    """GroupNorm exports as Reshape -> InstanceNormalization -> Reshape -> Mul/Add with unsqueezed scale and shift."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


class LayerScale(nn.Module):
    """A per-channel scale viewed onto the channel axis (x * gamma.view(1, -1, 1, 1))."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.head(self.conv(x) * self.gamma.view(1, -1, 1, 1))


class WeightNorm(nn.Module):
    """torch's weight_norm parametrization: the Linear's weight is g * v / ||v||, computed in the graph."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = weight_norm(nn.Linear(DIM, DIM)), nn.Linear(DIM, 4)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


class WeightStandardization(nn.Module):
    """timm's StdConv2d: the weight normalized per output channel by batch_norm, times a gain."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.gain = nn.Parameter(torch.ones(8, 1, 1, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return self.head(F.conv2d(x, w.reshape_as(self.weight) * self.gain))


class RelativePositionBias(nn.Module):
    """Swin-style: a bias table gathered by a constant index buffer, per head, added to the scores."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.out = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(TOKENS, 4)
        self.table = nn.Parameter(torch.randn(2 * TOKENS - 1, heads))
        index = torch.arange(TOKENS)[:, None] - torch.arange(TOKENS)[None] + TOKENS - 1
        self.register_buffer("index", index.reshape(-1))

    def forward(self, x):
        b, h = x.shape[0], self.heads
        q = self.q(x).view(b, TOKENS, h, DIM // h).transpose(1, 2)
        k = self.k(x).view(b, TOKENS, h, DIM // h).transpose(1, 2)
        bias = self.table[self.index].view(TOKENS, TOKENS, h).permute(2, 0, 1).unsqueeze(0)
        return self.out((q @ k.transpose(-1, -2) + bias).softmax(-1).sum(1))


class FourierEncoding(nn.Module):
    """A 1x1 conv of a fixed coordinate grid (a float buffer), added to the features."""

    def __init__(self):
        super().__init__()
        self.conv, self.encode, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 8, 1), nn.Conv2d(8, 4, 1)
        axis = torch.linspace(-1, 1, 8)
        self.register_buffer("grid", torch.stack(torch.meshgrid(axis, axis, indexing="ij")).unsqueeze(0))

    def forward(self, x):
        return self.head(self.conv(x) + torch.sin(self.encode(self.grid)))


CASES = {
    "position_table": (PositionTable, (1, TOKENS, DIM)),
    "class_token": (ClassToken, (1, TOKENS - 1, DIM)),
    "group_norm": (GroupNormNet, (1, 3, 10, 10)),
    "layer_scale": (LayerScale, (1, 3, 10, 10)),
    "weight_norm": (WeightNorm, (1, 5, DIM)),
    "weight_standardization": (WeightStandardization, (1, 3, 10, 10)),
    "relative_position_bias": (RelativePositionBias, (1, TOKENS, DIM)),
    "fourier_encoding": (FourierEncoding, (1, 3, 8, 8)),
}


def export(module: nn.Module, shape, path, fold: bool):
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path), dynamo=False, do_constant_folding=fold)
    return path


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_parameters_equal_torchs_count(name, fold, tmp_path):
    if name == "relative_position_bias" and fold:
        pytest.skip("constant folding stores the gathered bias, not the table (see the next test)")
    torch.manual_seed(0)
    module, shape = CASES[name][0](), CASES[name][1]
    result = onnx_morph.analyze(export(module, shape, tmp_path / f"{name}.onnx", fold))

    expected = sum(p.numel() for p in module.parameters())
    assert result.total.params == expected
    # The regularizer's polynomial and the budget's marginal costs see the same parameters.
    graph = result.graph
    alive = np.ones(graph.num_classes, dtype=bool)
    assert cost_terms(graph, "params").cost(alive) == pytest.approx(expected)
    assert (marginal_cost(graph, alive, "params") >= 0).all()


def test_folded_relative_position_bias_counts_what_the_file_stores(tmp_path):
    """torch's constant folding replaces table[index] by its [heads, T, T] result: the file holds no table."""
    torch.manual_seed(0)
    module = RelativePositionBias()
    result = onnx_morph.analyze(export(module, (1, TOKENS, DIM), tmp_path / "rpb.onnx", fold=True))
    table = module.table.numel()
    assert result.total.params == sum(p.numel() for p in module.parameters()) - table + 2 * TOKENS * TOKENS


def test_constant_conv_costs_its_weights_and_no_flops(tmp_path):
    torch.manual_seed(0)
    module = FourierEncoding()
    result = onnx_morph.analyze(export(module, (1, 3, 8, 8), tmp_path / "fourier.onnx", fold=False))
    # Only the convs on the input count FLOPs: 2 * 64 positions * (27 * 8 + 8 * 4).
    assert result.total.flops == 2 * 64 * (27 * 8 + 8 * 4)
    encode = module.encode.weight.numel() + module.encode.bias.numel()
    assert sum(op.params for op in result.ops if op.op_type == "Add") == encode  # the grid is not a parameter


def test_computed_table_counts_once_however_many_read_it(tmp_path):
    """One bias table gathered once and added in two places is one parameter tensor."""

    class Shared(RelativePositionBias):
        def forward(self, x):
            b, h = x.shape[0], self.heads
            q = self.q(x).view(b, TOKENS, h, DIM // h).transpose(1, 2)
            k = self.k(x).view(b, TOKENS, h, DIM // h).transpose(1, 2)
            bias = self.table[self.index].view(TOKENS, TOKENS, h).permute(2, 0, 1).unsqueeze(0)
            scores = q @ k.transpose(-1, -2)
            return self.out(((scores + bias).softmax(-1) + (scores * 2 + bias).softmax(-1)).sum(1))

    torch.manual_seed(0)
    module = Shared()
    result = onnx_morph.analyze(export(module, (1, TOKENS, DIM), tmp_path / "shared.onnx", fold=False))
    assert result.total.params == sum(p.numel() for p in module.parameters())


def test_layer_scale_params_shrink_with_the_channels(tmp_path):
    """A layer scale reached through Reshape loses the removed channels' entries in the effective count."""
    torch.manual_seed(0)
    module = LayerScale()
    with torch.no_grad():
        module.conv.weight[:3] = 0.0
        module.conv.bias[:3] = 0.0
    result = onnx_morph.analyze(export(module, (1, 3, 10, 10), tmp_path / "ls.onnx", fold=False),
                                weight_threshold=1e-9)
    kept = 5
    assert result.effective.params == kept * 27 + kept + kept + 4 * kept + 4
