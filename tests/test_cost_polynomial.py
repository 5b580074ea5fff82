"""One cost model: op totals, the model's total and marginal costs are evaluations of the per-op cost
polynomial (`cost_terms`), including the grouped and depthwise conv rule, written once.

The model (built here, random init) has a stem conv, a depthwise conv with channel multiplier 2, a
grouped conv (4 groups of 4 -> 3 channels), and two plain convs; at 8x8 with 3x3 kernels every
conv but the 1x1s does 2 * 64 * 9 FLOPs per channel pair.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from onnx_morph.costs import cost_terms, marginal_cost, op_costs, parse_hardware, total_cost
from onnx_morph.graph import build_channel_graph, load_model
from tools import zoo

PER_PAIR = 2 * 8 * 8 * 9  # FLOPs per channel pair of a 3x3 conv at 8x8
FIELDS = [("flops", "flops", {}), ("flops", "flops", {"macs": True}), ("params", "params", {}),
          ("activations", "activations", {}), ("memory_bytes", "memory", {}),
          ("latency_s", "latency", {"hardware": parse_hardware("V100")})]


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16)
        self.grouped, self.bn2 = nn.Conv2d(16, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12)
        self.mid, self.bn3 = nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        return self.head(torch.relu(self.bn3(self.mid(x))))


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    path = zoo.export_onnx(Grouped().eval(), (1, 3, 8, 8), tmp_path_factory.mktemp("poly") / "grouped.onnx")
    return build_channel_graph(load_model(path))


def masks(graph):
    rng = np.random.default_rng(0)
    yield np.ones(graph.num_classes, dtype=bool)
    for p in (0.3, 0.6, 0.9):
        yield rng.random(graph.num_classes) < p


def test_the_grouped_conv_is_one_row_per_group_and_the_depthwise_one_row(graph):
    flops = cost_terms(graph, "flops")
    grouped = [row for row in flops.rows if row.node == "/grouped/Conv"]
    depthwise = [row for row in flops.rows if row.node == "/dw/Conv"]
    assert [row.grouped for row in grouped] == [True] * 4 and [row.bilinear for row in grouped] == [(PER_PAIR,)] * 4
    assert [(r.in_classes.size, r.out_classes.size) for r in grouped] == [(4, 3)] * 4
    assert len(depthwise) == 1 and depthwise[0].depthwise == depthwise[0].out_linear == (PER_PAIR,)


@pytest.mark.parametrize("field,resource,options", FIELDS, ids=["flops", "macs", "params", "activations", "memory", "latency"])
def test_op_costs_are_the_polynomial_of_every_op(graph, field, resource, options):
    """Each op's cost in op_costs equals its rows' polynomial, evaluated alone at the same alive set."""
    for alive in masks(graph):
        ops = {op.node: op for op in op_costs(graph, alive, macs=options.get("macs", False), hardware=options.get("hardware"))}
        for name, relation in graph.relations.items():
            if relation.geometry is not None:
                alone = cost_terms(graph, resource, nodes={name}, **options)
                assert getattr(ops[name], field) == alone.cost(alive), (name, field)
        totals = sum(getattr(op, field) for op in ops.values())
        assert cost_terms(graph, resource, **options).cost(alive) == pytest.approx(totals, rel=1e-12)


def test_grouped_and_depthwise_flops_by_hand(graph):
    grouped, depthwise = "/grouped/Conv", "/dw/Conv"
    for alive in masks(graph):
        ops = {op.node: op for op in op_costs(graph, alive)}
        groups_alive = ops[grouped].out_alive // 3
        assert ops[grouped].in_alive == 4 * groups_alive
        assert ops[grouped].flops == PER_PAIR * 4 * 3 * groups_alive
        assert ops[depthwise].flops == PER_PAIR * ops[depthwise].out_alive
        assert total_cost(graph, alive, "flops") == sum(op.flops for op in ops.values())


def test_marginal_cost_is_the_gradient_of_the_polynomial(graph):
    """Removing a class saves exactly its marginal cost where it sits on one side of every op; where it
    feeds and leaves the same op the gradient counts the product twice, so the saving is smaller by
    that op's b * n_in * n_out: a grouped conv's group (4 in x 3 out), a depthwise channel pair's
    outputs (4, each tied to one input)."""
    grouped = {int(row.in_classes[0]) for row in cost_terms(graph, "flops").rows if row.grouped}
    assert len(grouped) == 4
    for alive in list(masks(graph))[:3]:
        for resource, per_pair in (("flops", PER_PAIR), ("params", 9)):
            marginal = marginal_cost(graph, alive, resource)
            before = total_cost(graph, alive, resource)
            for c in np.flatnonzero(alive & ~graph.class_pinned()).tolist():
                fewer = alive.copy()
                fewer[c] = False
                saving = before - total_cost(graph, fewer, resource)
                assert marginal[c] - saving == pytest.approx(per_pair * (4 * 3 + 4) if c in grouped else 0, abs=1e-9)


def test_copies_of_a_group_are_more_groups(graph):
    """Expansion: every prunable class copied twice doubles a grouped conv's groups (2x FLOPs), not
    their width (4x), and the depthwise conv's channels; a plain conv between copied classes costs 4x."""
    copies = np.where(graph.class_pinned(), 1, 2)
    base = {op.node: op.flops for op in op_costs(graph, np.ones(graph.num_classes, dtype=bool))}
    doubled = {op.node: op.flops for op in op_costs(graph, copies)}
    for name, factor in (("/stem/Conv", 2), ("/dw/Conv", 2), ("/grouped/Conv", 2), ("/mid/Conv", 4), ("/head/Conv", 2)):
        assert doubled[name] == factor * base[name] > 0, name
    assert total_cost(graph, copies, "flops") == sum(doubled.values())
