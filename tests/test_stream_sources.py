"""A channel is dead only when every contribution into it is: a producer without a regularization
source (a Conv without BatchNorm adding into a residual stream) keeps the stream's channels alive
in `analyze --gamma-threshold`, `prune`, the regularizer's alive count (numpy, the ONNX training
graph and torch) alike; with weight slices as the sources every producer has one."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import onnx_morph
from onnx_morph.cli import main as cli_main
from onnx_morph.errors import OptionError
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.rewrite import Threshold, prune
from onnx_morph.rewrite.training.regularizer import build_regularizer
from onnx_morph.torch import MorphNetRegularizer
from test_prune import max_rel_difference, zero_masked_difference
from test_torch_regularizer import check_against_onnx, ort_reference

from tools import zoo

SHAPE = (1, 3, 8, 8)
STREAM_DEAD = [1, 4, 6]   # both stream BatchNorms are 0 here, the side conv is not
HIDDEN_DEAD = [2, 3]      # the block's hidden BatchNorm (beta < 0: relu(beta) = 0)


class Stream(nn.Module):
    """stem conv+BN and a side conv WITHOUT BatchNorm add into one stream; a residual block
    (conv+BN+ReLU, conv+BN) adds into it too; the head reads it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        s = self.bn(self.stem(x)) + self.side(x)
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv(s))))) + s
        return self.head(y.mean((2, 3)))


def stream(zero_stream: bool = True, zero_hidden: bool = True) -> Stream:
    torch.manual_seed(0)
    module = Stream().eval()
    with torch.no_grad():
        for bn in (module.bn, module.bn2, module.bn3):
            bn.weight.copy_(torch.rand(8) + 0.5)
            bn.bias.copy_(torch.randn(8) * 0.1)
            bn.running_mean.copy_(torch.randn(8) * 0.1)
            bn.running_var.copy_(torch.rand(8) + 0.5)
        module.bn2.bias.copy_(-torch.rand(8) * 0.1 - 0.01)
        if zero_stream:
            module.bn.weight[STREAM_DEAD] = 0
            module.bn3.weight[STREAM_DEAD] = 0
        if zero_hidden:
            module.bn2.weight[HIDDEN_DEAD] = 0
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return zoo.export_onnx(stream(), SHAPE, tmp_path_factory.mktemp("stream") / "stream.onnx")


def test_gamma_threshold_keeps_a_stream_fed_by_a_producer_without_batchnorm(exported):
    analysis = onnx_morph.analyze(exported, gamma_threshold=1e-6)
    assert int((~analysis.alive).sum()) == len(HIDDEN_DEAD)
    result = prune(exported, Threshold(gamma=1e-6))
    assert result.removed_channels == len(HIDDEN_DEAD)
    assert {w.node: w.after for w in result.widths if w.after != w.before} == {"/conv/Conv": 8 - len(HIDDEN_DEAD)}
    # the pruned model computes the original: on fresh inputs, and in prune's own check
    assert max_rel_difference(exported, result.model, SHAPE, samples=4, seed=11) < 1e-5
    assert zero_masked_difference(exported, result, SHAPE) < 1e-5
    assert result.original_deviation.max_rel < 1e-5 and not result.notes
    assert onnx_morph.analyze(result.model).total.flops == analysis.effective.flops


def test_the_regularizers_alive_counts_agree_with_analyze(exported):
    analysis = onnx_morph.analyze(exported, gamma_threshold=1e-6)
    graph = build_channel_graph(load_model(exported))
    spec = build_regularizer(graph, kind="gamma", threshold=1e-6)
    params = {s.param: graph.model.constant(s.param) for s in spec.sources}
    alive = spec.alive(spec.vector(params))[:-1]
    np.testing.assert_array_equal(alive, analysis.alive)
    assert spec.evaluate(params)[0] == pytest.approx(analysis.effective.flops)
    stream_classes = graph.classes("/Add_output_0")
    assert spec.fixed[stream_classes].all() and not spec.fixed[graph.classes("/bn2/BatchNormalization_output_0")].any()

    reg = MorphNetRegularizer(stream(), torch.randn(*SHAPE), threshold=1e-6)
    out = reg()
    assert out.alive_channels == int(analysis.alive.sum())
    assert float(out.cost) == pytest.approx(analysis.effective.flops)
    _, onnx_cost, _ = ort_reference(reg)  # the training graph's alive counts
    assert onnx_cost == pytest.approx(analysis.effective.flops)


def test_torch_regularizer_matches_the_training_graph_on_a_stream():
    check_against_onnx(stream(zero_stream=False, zero_hidden=False), SHAPE, "gamma")


def test_without_the_side_producer_the_stream_dies(tmp_path):
    """The same model without the side conv: the BatchNorms reach every contribution into the
    stream, and its channels 1, 4, 6 die."""

    class NoSide(Stream):
        def forward(self, x):
            s = self.bn(self.stem(x))
            y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv(s))))) + s
            return self.head(y.mean((2, 3)))

    module = NoSide()
    module.load_state_dict(stream().state_dict())
    with torch.no_grad():
        module.bn.bias[STREAM_DEAD] = 0
        module.bn3.bias[STREAM_DEAD] = 0
    path = zoo.export_onnx(module.eval(), SHAPE, tmp_path / "noside.onnx")
    assert int((~onnx_morph.analyze(path, gamma_threshold=1e-6).alive).sum()) == len(HIDDEN_DEAD) + len(STREAM_DEAD)
    result = prune(path, Threshold(gamma=1e-6))
    assert result.removed_channels == len(HIDDEN_DEAD) + len(STREAM_DEAD)
    assert max_rel_difference(path, result.model, SHAPE, samples=4, seed=11) < 1e-5


def test_weight_threshold_counts_every_weighted_producer(tmp_path):
    """With weight slices as sources the side conv has one: the stream dies only with it."""
    module = stream(zero_stream=False, zero_hidden=False)
    with torch.no_grad():
        for conv in (module.stem, module.conv3):
            conv.weight[STREAM_DEAD] = 0
    half = zoo.export_onnx(copy.deepcopy(module), SHAPE, tmp_path / "half.onnx")
    assert onnx_morph.analyze(half, weight_threshold=1e-6).alive.all()
    with torch.no_grad():
        module.side.weight[STREAM_DEAD] = 0
        module.side.bias[STREAM_DEAD] = 0
    whole = zoo.export_onnx(module, SHAPE, tmp_path / "whole.onnx")
    assert int((~onnx_morph.analyze(whole, weight_threshold=1e-6).alive).sum()) == len(STREAM_DEAD)
    result = prune(whole, Threshold(weight=1e-6))
    assert result.removed_channels == len(STREAM_DEAD)
    assert result.masked_deviation.max_rel < 1e-5  # the BatchNorms' shifts are constants, kept where not folded


def test_a_blacklisted_batchnorm_no_longer_decides_its_channels(exported):
    graph = build_channel_graph(load_model(exported))
    bn3 = next(n for n in graph.nodes if n.startswith("/bn3/"))
    stream_classes = graph.classes("/Add_output_0")
    side_free = build_regularizer(graph, blacklist=[bn3])
    assert side_free.fixed[stream_classes].all()


def test_squeeze_excitation_channels_stay_regularized(tmp_path):
    """An SE gate (a conv without BatchNorm) multiplies the channels: a dead operand kills a product,
    so the gate does not keep them alive."""
    tv = zoo.import_torchvision()
    torch.manual_seed(0)
    path = zoo.export_onnx(tv.models.mobilenet_v3_small(weights=None).eval(), (1, 3, 32, 32), tmp_path / "m.onnx")
    graph = build_channel_graph(load_model(path))
    spec = build_regularizer(graph, kind="gamma")
    se_scaled = next(n for n in graph.nodes if n.endswith("block.2/Mul"))
    classes = graph.classes(graph.nodes[se_scaled].output[0])
    assert not spec.fixed[classes].any()


def test_a_regularizer_with_no_channel_that_can_die_says_why(tmp_path):
    class OnlyStream(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(self.bn(self.a(x)) + self.b(x))

    path = zoo.export_onnx(OnlyStream(), SHAPE, tmp_path / "only.onnx")
    with pytest.raises(OptionError, match="also fed by a producer without one .* so none can die: use the group-lasso"):
        build_regularizer(build_channel_graph(load_model(path)))


def test_a_budget_that_is_not_met_says_so(exported, tmp_path, capsys):
    """The stream's channels have nothing to rank them by (their BatchNorm scales do not decide
    them): a budget that needs them is not met, and the report says so."""
    code = cli_main(["prune", str(exported), "-o", str(tmp_path / "small.onnx"), "--ratio", "0.2"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^note: flops target \S+ not reached: \S+ \(36% of \S+\) remain; 8 prunable channels have "
                     r"nothing to rank them by", out, re.M), out
