"""Property-based tests (hypothesis): random CNNs built in torch from convs (strided or not),
depthwise and grouped convs, residual adds, concats, split-and-merge blocks, squeeze-excitation
gates and channel shuffles, exported to ONNX. For every such model:

1. every channel of every activation belongs to exactly one group, and every channel class to one group;
2. the cost model's FLOPs of the unpruned model equal an independent count over the exported graph
   (the shapes onnxruntime produces, 2 per multiply-accumulate of every Conv and Gemm);
3. analyze is deterministic (same report, same channel classes, also from a copy of the file);
4. pruning any allowed mask (any subset of each prunable group's channel classes, one kept) gives a
   valid model whose outputs equal the original's with the removed channels zeroed, on inputs the
   pruning never saw, and whose FLOPs are what the cost model predicted for the mask.

Examples are derandomized (the same ones each run, so CI stays stable) and few, for speed.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import onnx_morph
from onnx_morph.costs import op_costs, totals_of
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.surgery.select import mask_document
from onnx_morph.rewrite.surgery.surgery import keep_masks
from onnx_morph.rewrite.surgery.verify import deviation, masked_original, random_inputs, run

from tools import zoo

REL_TOL = 1e-4
INPUT = (1, 3, 8, 8)
WIDTHS = (4, 6, 8, 12)  # even, so grouped convs (2 groups) and shuffles (2 groups) always fit


# --------------------------------------------------------------------------- #
# Random architectures
# --------------------------------------------------------------------------- #

BLOCK = st.one_of(
    st.tuples(st.just("conv"), st.sampled_from(WIDTHS), st.sampled_from([1, 2])),
    st.tuples(st.just("depthwise"), st.sampled_from([1, 2])),
    st.tuples(st.just("grouped")),
    st.tuples(st.just("residual")),
    st.tuples(st.just("concat"), st.sampled_from([2, 4, 6])),
    st.tuples(st.just("split")),
    st.tuples(st.just("se")),
    st.tuples(st.just("shuffle")),
)
SPEC = st.lists(BLOCK, min_size=1, max_size=6)


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = zoo.ConvBNAct(c, c, k=3, act=None)

    def forward(self, x):
        return F.relu(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, c: int, a: int):
        super().__init__()
        self.left, self.right = zoo.ConvBNAct(c, a, k=1), zoo.ConvBNAct(c, 4, k=3)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=1)


class SplitMerge(nn.Module):
    """ShuffleNet-style: the first half passes, the second half goes through a conv."""

    def __init__(self, c: int):
        super().__init__()
        self.half = c // 2
        self.branch = zoo.ConvBNAct(c - self.half, c - self.half, k=1)

    def forward(self, x):
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([a, self.branch(b)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(2, c // 4), 1), nn.Conv2d(max(2, c // 4), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Shuffle(nn.Module):
    def forward(self, x):
        return zoo.channel_shuffle(x, 2)


class RandomCNN(nn.Module):
    """A stem conv (so prunable groups exist), the drawn blocks, then pooling and a Linear head."""

    def __init__(self, spec: list[tuple]):
        super().__init__()
        c = 8
        blocks: list[nn.Module] = [zoo.ConvBNAct(INPUT[1], c)]
        for kind, *args in spec:
            if kind == "conv":
                blocks.append(zoo.ConvBNAct(c, args[0], k=3, stride=args[1]))
                c = args[0]
            elif kind == "depthwise":
                blocks.append(zoo.ConvBNAct(c, c * args[0], k=3, groups=c))
                c *= args[0]
            elif kind == "grouped":
                blocks.append(zoo.ConvBNAct(c, c, k=3, groups=2))
            elif kind == "residual":
                blocks.append(Residual(c))
            elif kind == "concat":
                blocks.append(Concat(c, args[0]))
                c = args[0] + 4
            elif kind == "split":
                blocks.append(SplitMerge(c))
            elif kind == "se":
                blocks.append(SqueezeExcite(c))
            else:
                blocks.append(Shuffle())
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1))


def export(spec: list[tuple], seed: int, folder: Path) -> Path:
    torch.manual_seed(seed)
    module = RandomCNN(spec)
    zoo._randomize_bn(module)  # non-trivial BatchNorms: a dropped or misplaced one changes outputs
    return zoo.export_onnx(module, INPUT, folder / "random_cnn.onnx")


# --------------------------------------------------------------------------- #
# Independent references
# --------------------------------------------------------------------------- #


def independent_flops(path: Path) -> int:
    """2 per multiply-accumulate of every Conv and Gemm of the exported graph, with the tensor shapes
    that onnxruntime actually produces (onnx's shape inference cannot see through the exporter's
    run-time split sizes) and the initializers' dims: Conv 2*N*prod(out spatial)*C_out*prod(W.shape[1:]),
    Gemm 2*M*K*N."""
    model = onnx.load(str(path))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert all(n.op_type != "MatMul" for n in nodes), "the random models have no MatMul"
    probes = list(dict.fromkeys(t for n in nodes for t in (n.input[0], n.output[0])))
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in probes if t not in existing)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"input": np.zeros(INPUT, np.float32)})
    shapes = {name: list(v.shape) for name, v in zip(names, values)}
    total = 0
    for node in nodes:
        if node.op_type == "Conv":
            out, weight = shapes[node.output[0]], weights[node.input[1]]
            total += 2 * out[0] * math.prod(out[2:]) * weight[0] * math.prod(weight[1:])
        else:
            a, b = shapes[node.input[0]], weights[node.input[1]]
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            trans_b = any(at.name == "transB" and at.i for at in node.attribute)
            rows, inner = (a[1], a[0]) if trans_a else (a[0], a[1])
            total += 2 * rows * inner * (b[0] if trans_b else b[1])
    return total


def random_mask(graph, rng: np.random.Generator) -> np.ndarray:
    """Any allowed mask: each prunable group loses a random subset of its classes (keeps one)."""
    alive = np.ones(graph.num_classes, dtype=bool)
    for group in graph.groups:
        if group.prunable and group.size > 1:
            count = int(rng.integers(0, group.size))
            alive[rng.choice(group.classes, size=count, replace=False)] = False
    return alive


# --------------------------------------------------------------------------- #
# The property
# --------------------------------------------------------------------------- #


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=SPEC, seed=st.integers(0, 2**31 - 1))
def test_random_cnn_properties(spec, seed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("random_cnn")
    path = export(spec, seed, folder)
    result = onnx_morph.analyze(path)
    graph = result.graph

    # 1. a partition: every channel element of every tensor in exactly one group, every class in one group
    classes = np.sort(np.concatenate([g.classes for g in graph.groups]))
    assert np.array_equal(classes, np.arange(graph.num_classes))
    for tensor in graph.offsets:
        owned = np.sort(np.concatenate([g.tensors[tensor] for g in graph.groups if tensor in g.tensors]))
        assert np.array_equal(owned, np.arange(graph.tensors[tensor].channels)), tensor
        for group in graph.groups:
            if tensor in group.tensors:
                assert set(graph.classes(tensor)[group.tensors[tensor]].tolist()) <= set(group.classes.tolist())
    for group in result.groups:
        assert group.prunable == (not group.pin_reasons), group

    # 2. FLOPs against an independent count
    assert result.total.flops == independent_flops(path)

    # 3. deterministic, also from another path
    copy = folder / "copy.onnx"
    shutil.copy(path, copy)
    for again in (onnx_morph.analyze(path), onnx_morph.analyze(copy)):
        assert np.array_equal(again.graph.class_of, graph.class_of)
        first, second = result.to_json(), again.to_json()
        first.pop("model"), second.pop("model")
        assert first == second

    # 4. any allowed mask: a valid model equal to the zero-masked original, costing what was predicted
    prunable = [g for g in graph.groups if g.prunable and g.size > 1]
    event(f"prunable groups: {min(len(prunable), 3)}{'+' if len(prunable) >= 3 else ''}")
    if not prunable:
        return
    alive = random_mask(graph, np.random.default_rng(seed))
    event(f"removed channel classes: {'none' if alive.all() else 'some'}")
    pruned = prune(path, Mask(mask_document(graph, alive)))
    assert np.array_equal(pruned.alive, alive)
    onnx.checker.check_model(pruned.model, full_check=True)
    assert pruned.masked_deviation.max_rel < REL_TOL
    feeds = random_inputs(graph, samples=2, seed=seed % 1000 + 1)  # inputs prune never saw
    masked = masked_original(graph, graph.model.materialized(), keep_masks(graph, alive))
    assert deviation(run(graph, masked, feeds), run(graph, pruned.model, feeds)).max_rel < REL_TOL
    assert onnx_morph.analyze(pruned.model).total.flops == totals_of(op_costs(graph, alive)).flops


@pytest.mark.parametrize("spec", [
    [("conv", 6, 2), ("depthwise", 2), ("grouped",), ("residual",)],
    [("concat", 4), ("split",), ("se",), ("shuffle",), ("conv", 12, 1)],
])
def test_every_block_kind_exports_and_analyzes(spec, tmp_path):
    """The strategy's blocks all build, export and get costed (a guard on the generator itself)."""
    path = export(spec, 0, tmp_path)
    result = onnx_morph.analyze(path)
    assert result.total.flops == independent_flops(path) > 0
    assert any(g.prunable for g in result.groups)
