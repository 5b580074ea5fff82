"""The regularizer's options (MorphNet's boundaries, blacklist, force-group, threshold) on the
channel graph of a real export, checked against the per-op cost model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnx_morph.costs import op_costs
from onnx_morph.errors import OptionError
from onnx_morph.examples import export
from onnx_morph.graph import build_channel_graph, load_model
from onnx_morph.rewrite.training.regularizer import build_regularizer
from test_train import CoupledNet


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    torch.manual_seed(3)
    net = CoupledNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.2, 1.0)
    path = export(net, (1, 1, 8, 8), tmp_path_factory.mktemp("reg") / "coupled.onnx")
    return build_channel_graph(load_model(path))


def _params(graph, regularizer):
    return {s.param: graph.model.constant(s.param) for s in regularizer.sources}


def _node(graph, fragment: str) -> str:
    return next(n for n in graph.nodes if fragment in n)


def test_blacklist_removes_sources(graph):
    """The left branch's channels are regularized by its BN and, through the depthwise conv that
    ties them, by the depthwise BN: blacklisting both leaves them unregularized."""
    full = build_regularizer(graph)
    left = graph.classes(graph.nodes[_node(graph, "left.1/BatchNormalization")].output[0])
    one = build_regularizer(graph, blacklist=[r"/left/left\.1/.*"])
    assert len(one.sources) == len(full.sources) - 1 and not one.fixed[left].any()
    listed = build_regularizer(graph, blacklist=[r"/left/left\.1/.*", r"/depthwise/depthwise\.1/.*"])
    assert len(listed.sources) == len(full.sources) - 2
    assert listed.fixed[left].all() and not full.fixed[left].any()
    assert listed.evaluate(_params(graph, listed))[1] < full.evaluate(_params(graph, full))[1]


def test_output_boundary_costs_only_the_ops_before_it(graph):
    boundary = _node(graph, "depthwise.0/Conv")
    regularizer = build_regularizer(graph, output_boundary=[boundary])
    alive = np.ones(graph.num_classes, dtype=bool)
    cost = regularizer.terms.cost(alive)
    upstream = {"/stem/stem.0/Conv", "/left/left.0/Conv", "/right/right.0/Conv", boundary}
    assert set(regularizer.terms.nodes) == upstream
    assert cost == pytest.approx(sum(op.flops for op in op_costs(graph, alive) if op.node in upstream))


def test_input_boundary_excludes_the_ops_up_to_it(graph):
    boundary = _node(graph, "stem.2/Relu")
    regularizer = build_regularizer(graph, input_boundary=[boundary])
    assert "/stem/stem.0/Conv" not in regularizer.terms.nodes and "/head/Gemm" in regularizer.terms.nodes
    stem_bn = graph.classes(graph.nodes[_node(graph, "stem.1/BatchNormalization")].output[0])
    project = build_regularizer(graph)
    assert not project.fixed[stem_bn].any()


def test_force_group_combines_by_max(graph):
    pattern = r"/(left|right)/(left|right)\.0/Conv"
    forced = build_regularizer(graph, force_group=[pattern])
    left = graph.classes(graph.nodes["/left/left.0/Conv"].output[0])
    right = graph.classes(graph.nodes["/right/right.0/Conv"].output[0])
    np.testing.assert_array_equal(forced.gather[:, left], forced.gather[:, right])
    vector = forced.vector(_params(graph, forced))
    free = build_regularizer(graph).vector(_params(graph, forced))
    np.testing.assert_allclose(vector[left], np.maximum(free[left], free[right]))


@pytest.mark.parametrize("options,message", [
    ({"blacklist": ["nope"]}, "blacklist pattern 'nope' matches no node"),
    ({"force_group": ["(unclosed"]}, "not a regular expression"),
    ({"force_group": [r"/(stem/stem|depthwise/depthwise)\.0/Conv"]}, "different widths"),
    ({"kind": "l2"}, "unknown regularizer 'l2'"),
    ({"cost": "memory"}, "unknown cost 'memory'"),
    ({"threshold": -1.0}, "threshold"),
    ({"l1_fraction": 2.0}, "l1_fraction"),
])
def test_bad_options(graph, options, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        build_regularizer(graph, **options)
