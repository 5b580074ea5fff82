"""Constants that the weightless load does not evaluate (initializers over 1024 elements): an
exporter's Identity alias of a shared bias, and weights computed from constants (weight
standardization, as timm's ScaledStdConv2d exports it) are pruned exactly, and ranked for budgets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import onnx_morph
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.rewrite import Budget, Mask, Threshold, prune
from onnx_morph.rewrite.surgery.select import mask_document
from test_prune import max_rel_difference, zero_masked_difference

from tools import zoo


def aliased_bias_model(c_out: int) -> onnx.ModelProto:
    """conv1 -> BN (gamma 0 on channels 1, 5) -> ReLU -> two 1x1 convs whose bias is an Identity of one
    shared initializer of c_out elements -> Add."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    gamma = (rng.random(8) + 0.5).astype(np.float32)
    gamma[[1, 5]] = 0
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("w1", normal(8, 4, 1, 1)), ("g", gamma), ("b", normal(8) * 0.5), ("m", normal(8) * 0.1),
        ("v", np.abs(normal(8)) + 0.5), ("w2", normal(c_out, 8, 1, 1)), ("w3", normal(c_out, 8, 1, 1)),
        ("shared_bias", normal(c_out))]]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Identity", ["shared_bias"], ["bias2"], name="alias2"),
        helper.make_node("Identity", ["shared_bias"], ["bias3"], name="alias3"),
        helper.make_node("Conv", ["r", "w2", "bias2"], ["y2"], name="conv2"),
        helper.make_node("Conv", ["r", "w3", "bias3"], ["y3"], name="conv3"),
        helper.make_node("Add", ["y2", "y3"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "aliased_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("c_out", [16, 1024])
def test_constants_fold_into_an_aliased_shared_bias(c_out, tmp_path):
    """The removed channels hold relu(beta): conv2 and conv3 fold it into new biases, and the
    shared initializer behind the aliases (over the loader's 1024-element limit or not) is read."""
    path = tmp_path / "aliased.onnx"
    onnx.save(aliased_bias_model(c_out), str(path))
    result = prune(path, Threshold(gamma=1e-6))
    assert result.removed_channels == 2
    assert max_rel_difference(path, result.model, (1, 4, 2, 2), samples=4, seed=3) < 1e-5
    assert result.original_deviation.max_rel < 1e-5


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight standardized per output channel, times a gain."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(c_out, 1, 1, 1) + 0.5)
        self.scale = (c_in * 9) ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, padding=self.padding)


class StdNet(nn.Module):
    """Weights of 16 x 16 x 3 x 3 = 2304 elements: computed at run time in the weightless view."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = ScaledStdConv2d(16, 16), ScaledStdConv2d(16, 16), ScaledStdConv2d(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.head(x.mean((2, 3)))


SHAPE = (1, 16, 6, 6)


@pytest.fixture(scope="module")
def std_path(tmp_path_factory):
    torch.manual_seed(0)
    return zoo.export_onnx(StdNet().eval(), SHAPE, tmp_path_factory.mktemp("std") / "std.onnx")


def test_standardized_weights_are_pruned_exactly(std_path):
    graph = build_channel_graph(load_model(std_path))
    prunable = [g for g in graph.groups if g.prunable]
    assert len(prunable) == 3
    alive = np.ones(graph.num_classes, dtype=bool)
    rng = np.random.default_rng(1)
    for group in prunable:
        alive[rng.choice(group.classes, size=5, replace=False)] = False
    result = prune(std_path, Mask(mask_document(graph, alive)))
    assert result.removed_channels == 15
    assert zero_masked_difference(std_path, result, SHAPE) < 1e-5
    assert onnx_morph.analyze(result.model).total.flops == result.after.flops


def test_a_budget_ranks_standardized_weights(std_path):
    """The computed weights are evaluated for the ranking too: the budget is met."""
    result = prune(std_path, Budget(ratio=0.7))
    assert result.removed_channels > 0 and result.after.flops <= 0.7 * result.before.flops
    assert not any("not reached" in n for n in result.notes)
    assert zero_masked_difference(std_path, result, SHAPE) < 1e-5
