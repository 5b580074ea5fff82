"""onnx_morph.torch: the torch regularizer against the ONNX rewrite run in onnxruntime (value, and
the gradient onnxruntime-training's gradient builder derives from the same nodes), the numpy
reference, the parameter mapping, structure export, pruning, and a 2-process DDP run."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from onnx_morph.errors import OptionError
from onnx_morph.rewrite.training.training_graph import EFFECTIVE_COST, PREFIX, REGULARIZATION, add_regularizer
from onnx_morph.rewrite.surgery.verify import onnxruntime
from onnx_morph.torch import MorphNetRegularizer, export_onnx, export_structure, prune_module

from tools import zoo

GAMMA_MODELS = [n for n in zoo.ZOO if n not in ("SEBlock", "TransformerBlock", "UnknownOpNet")]
LASSO_MODELS = [n for n in zoo.ZOO if n != "UnknownOpNet"]


def ort_reference(reg: MorphNetRegularizer, vector_on_left: bool = True) -> tuple[float, float, dict[str, np.ndarray]]:
    """(regularization, effective cost, gradient per source initializer) from the ONNX rewrite:
    `add_regularizer`'s nodes with the sources as graph inputs, differentiated by onnxruntime's
    GradientGraphBuilder (the builder onnxruntime-training's artifacts use) and run in a session.

    onnxruntime-training 1.19.2 builds a wrong gradient for MatMul(matrix, 1-D vector), which the
    rewrite uses for counts @ r; with `vector_on_left` those nodes become the equivalent
    MatMul(r, counts^T), whose gradient is right (see test_onnxruntime_matmul_vector_gradient).
    """
    ort = onnxruntime()
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    full = add_regularizer(reg.graph.model.materialized(), reg.spec)
    names = [b.initializer for b in reg.bindings]
    params = reg.source_parameters()
    nodes = [n for n in full.graph.node if n.name.startswith(PREFIX)]
    initializers = [t for t in full.graph.initializer if t.name.startswith(PREFIX)]
    if vector_on_left:
        matrices = {t.name: t for t in initializers if len(t.dims) == 2}
        for node in nodes:
            if node.op_type == "MatMul" and node.input[0] in matrices and node.input[1] not in matrices:
                transposed = numpy_helper.from_array(numpy_helper.to_array(matrices[node.input[0]]).T.copy(),
                                                     node.input[0] + "/T")
                initializers.append(transposed)
                node.input[:] = [node.input[1], transposed.name]
    graph = helper.make_graph(
        nodes, "regularizer",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(p.shape)) for n, p in zip(names, params)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in (REGULARIZATION, EFFECTIVE_COST)],
        initializers)
    model = helper.make_model(graph, opset_imports=full.opset_import, ir_version=full.ir_version)
    builder = GradientGraphBuilder(model.SerializeToString(), {REGULARIZATION}, set(names), REGULARIZATION)
    builder.build()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(builder.get_model(), options, providers=["CPUExecutionProvider"])
    feeds = {n: p.detach().numpy() for n, p in zip(names, params)}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    return float(outputs[REGULARIZATION]), float(outputs[EFFECTIVE_COST]), {n: outputs[f"{n}_grad"] for n in names}


def median_threshold(module: nn.Module, shape, kind: str, **options) -> float:
    """A threshold that kills about half of the regularized channels, so alive counts matter."""
    vector = MorphNetRegularizer(module, torch.randn(*shape), regularizer=kind, **options).vector()
    return float(np.median(vector[vector > 0]))


def check_against_onnx(module: nn.Module, shape, kind: str, **options) -> MorphNetRegularizer:
    threshold = median_threshold(module, shape, kind, **options)
    reg = MorphNetRegularizer(module, torch.randn(*shape), regularizer=kind, threshold=threshold, **options)
    module.zero_grad(set_to_none=True)
    out = reg()
    out.regularization.backward()
    value, cost, grads = ort_reference(reg)
    assert 0 < out.alive_channels < reg.graph.num_classes
    assert float(out.regularization) == pytest.approx(value, rel=1e-5)
    assert float(out.cost) == pytest.approx(cost, rel=1e-5)
    for binding, param in zip(reg.bindings, reg.source_parameters()):
        expected = grads[binding.initializer]
        scale = float(np.abs(expected).max()) or 1.0
        np.testing.assert_allclose(param.grad.numpy(), expected, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=f"gradient of {binding.parameter}")
    # The numpy reference (float64) agrees too.
    values = {b.initializer: p.detach().numpy() for b, p in zip(reg.bindings, reg.source_parameters())}
    np_cost, np_reg = reg.spec.evaluate(values)
    assert float(out.regularization) == pytest.approx(np_reg, rel=1e-5)
    assert float(out.cost) == pytest.approx(np_cost, rel=1e-5)
    # Gradients reach the sources, only the channels the gather uses (pinned channels are not
    # regularized; a class's gradient goes to its largest source), and nothing else.
    sources = {b.parameter for b in reg.bindings}
    used = set(reg.spec.gather.ravel().tolist())
    offset = 0
    for binding, param in zip(reg.bindings, reg.source_parameters()):
        per_channel = param.grad.abs().movedim(binding.axis, 0).reshape(binding.channels, -1).sum(1)
        for channel in torch.nonzero(per_channel).ravel().tolist():
            assert offset + channel in used, f"{binding.parameter}[{channel}] is pinned but got a gradient"
        offset += binding.channels
    assert sum(float(p.grad.abs().sum()) for p in reg.source_parameters()) > 0
    for name, param in module.named_parameters():
        if name not in sources:
            assert param.grad is None, f"{name} is no source but got a gradient"
    return reg


@pytest.mark.parametrize("name", GAMMA_MODELS)
def test_gamma_matches_onnx(name):
    factory, shape = zoo.ZOO[name]
    module = factory()
    reg = check_against_onnx(module, shape, "gamma")
    modules = dict(module.named_modules())
    assert all(isinstance(modules[b.parameter.rpartition(".")[0]], nn.BatchNorm2d) for b in reg.bindings)


@pytest.mark.parametrize("name", LASSO_MODELS)
def test_group_lasso_matches_onnx(name):
    factory, shape = zoo.ZOO[name]
    module = factory()
    reg = check_against_onnx(module, shape, "group-lasso", l1_fraction=0.25)
    assert all(b.parameter.endswith("weight") and module.get_parameter(b.parameter).dim() >= 2 for b in reg.bindings)


@pytest.mark.parametrize("name,cost", [("Bottleneck", "latency:T4"), ("InvertedResidual", "latency:V100"),
                                       ("ResNeXtBlock", "params"), ("InceptionBlock", "activations")])
def test_other_costs_match_onnx(name, cost):
    factory, shape = zoo.ZOO[name]
    check_against_onnx(factory(), shape, "gamma", cost=cost)


def _slopes_per_class(graph, table) -> np.ndarray:
    """d latency / d (alive channels) of each class at the full widths, as finite differences of the
    table to the next lower grid width, summed over the timed ops that read or write the class."""
    per_class = np.zeros(graph.num_classes + 1)
    for name, op in table.ops.items():
        geometry = graph.relations[name].geometry
        full = op.latency(op.in_width, op.out_width)
        for side, tensor, axis in (("in", geometry.input, geometry.in_axis), ("out", geometry.output, geometry.out_axis)):
            width = op.in_width if side == "in" else op.out_width
            lower = [g for g in (op.grid_in if side == "in" else op.grid_out) if g < width]
            classes = graph.axis_classes(tensor, axis)
            if not lower or (side == "in" and op.tied) or classes is None:
                continue
            fewer = op.latency(lower[-1], op.out_width) if side == "in" else op.latency(op.in_width, lower[-1])
            np.add.at(per_class, classes, table.scale * (full - fewer) / (width - lower[-1]))
    return per_class


def test_measured_latency_table_in_torch(tmp_path):
    """cost='latency:measured=TABLE', a table `onnx-morph profile` wrote for the module's own export:
    at the current widths the cost is the table's predicted latency; the gradient of each gamma is the
    table's slopes (finite differences) of the ops reading and writing its channel; with half the
    channels dead, value and gradient equal the ONNX rewrite's and the numpy reference's."""
    from onnx_morph.costs.measured import load_table
    from onnx_morph.profile import Timing, profile
    from onnx_morph.rewrite.surgery.latency import LatencyModel

    factory, shape = zoo.ZOO["ConvStack"]
    module = factory()
    path = tmp_path / "convstack.onnx"
    onnx.save(MorphNetRegularizer(module, torch.randn(*shape), regularizer="gamma").graph.model.model, path)
    profiled = profile(path, timing=Timing(warmup=1, repeats=3, min_seconds=0.0), max_points=3,
                       cache=tmp_path / "cache", progress=None)
    document = profiled.to_json()
    # A staircase-free synthetic latency on the profiled grids, so that every slope is positive and
    # differs from the others (timings of ops this small are mostly noise).
    for entry in document["ops"].values():
        widths_in = entry["out"] if entry["tied"] else entry["in"]
        ms = [[0.01 + 1e-4 * (i + 1) * (7 * o + 3) for o in entry["out"]] for i in widths_in]
        entry["ms"] = ms[-1] if entry["tied"] else ms
    for name, doc in (("profiled", profiled.to_json()), ("synthetic", document)):
        table_path = tmp_path / f"{name}.json"
        table_path.write_text(json.dumps(doc))
        table = load_table(table_path)
        cost = f"latency:measured={table_path}"
        reg = MorphNetRegularizer(module, torch.randn(*shape), regularizer="gamma", cost=cost)
        module.zero_grad(set_to_none=True)
        out = reg()
        out.regularization.backward()
        assert bool(out.alive.all())
        assert float(out.cost) == pytest.approx(table.model_seconds, rel=1e-6)
        assert float(out.cost) == pytest.approx(LatencyModel(reg.graph, table).predict(out.alive.numpy()), rel=1e-6)
        per_class = _slopes_per_class(reg.graph, table)
        offset = 0
        for binding, param in zip(reg.bindings, reg.source_parameters()):
            slopes = [per_class[np.flatnonzero((reg.spec.gather == offset + j).any(0))].sum()
                      for j in range(binding.channels)]
            expected = np.sign(param.detach().numpy()) * np.array(slopes)
            np.testing.assert_allclose(param.grad.numpy(), expected, rtol=1e-5, atol=1e-9 * np.abs(per_class).max(),
                                       err_msg=f"{name} table: gradient of {binding.parameter}")
            offset += binding.channels
        values = {b.initializer: p.detach().numpy() for b, p in zip(reg.bindings, reg.source_parameters())}
        assert (float(out.cost), float(out.regularization.detach())) == pytest.approx(reg.spec.evaluate(values), rel=1e-5)
    assert (np.abs(per_class) > 0).sum() >= 8  # the synthetic table's slopes, which the profiled one may lack
    check_against_onnx(module, shape, "gamma", cost=cost)


def test_onnxruntime_matmul_vector_gradient():
    """Why ort_reference moves the vector to the left: onnxruntime-training 1.19.2's gradient of
    MatMul(A, x) with a 1-D x is wrong, that of MatMul(x, A^T) is right. If this test fails,
    onnxruntime was fixed and the workaround can go."""
    ort = onnxruntime()
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    a = np.array([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=np.float32)
    w = np.array([1, 10, 100], dtype=np.float32)

    def gradient(matmul: onnx.NodeProto, matrix: np.ndarray) -> np.ndarray:
        graph = helper.make_graph(
            [matmul, helper.make_node("Mul", ["w", "y"], ["wy"]), helper.make_node("ReduceSum", ["wy"], ["loss"], keepdims=0)],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
            [numpy_helper.from_array(matrix, "a"), numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        builder = GradientGraphBuilder(model.SerializeToString(), {"loss"}, {"x"}, "loss")
        builder.build()
        session = ort.InferenceSession(builder.get_model(), providers=["CPUExecutionProvider"])
        return session.run(["x_grad"], {"x": np.arange(4, dtype=np.float32)})[0]

    expected = a.T @ w  # [101, 101, 111, 110]
    np.testing.assert_allclose(gradient(helper.make_node("MatMul", ["x", "a"], ["y"]), a.T.copy()), expected)
    assert not np.allclose(gradient(helper.make_node("MatMul", ["a", "x"], ["y"]), a), expected)


def test_onnx_rewrite_gradient_as_emitted():
    factory, shape = zoo.ZOO["ConvStack"]
    module = factory()
    reg = MorphNetRegularizer(module, torch.randn(*shape), threshold=0.9)
    reg().regularization.backward()
    _, _, grads = ort_reference(reg, vector_on_left=False)
    for binding, param in zip(reg.bindings, reg.source_parameters()):
        np.testing.assert_allclose(param.grad.numpy(), grads[binding.initializer], rtol=1e-5)


class TinyResNet(nn.Module):
    """stem -> residual block -> 1x1 head: the stem's and the block's last BatchNorm share channels
    (two sources per class), and in a fresh model every BatchNorm scale is 1, so the exporter
    merges them into one initializer."""

    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_fresh_model_maps_every_source_to_its_own_parameter():
    torch.manual_seed(0)
    module = TinyResNet()
    plain = onnx.load_from_string(export_onnx(module, torch.randn(1, 3, 8, 8)).SerializeToString())
    assert len([t for t in plain.graph.initializer if t.name.endswith("weight") and len(t.dims) == 1]) < 3  # merged
    reg = MorphNetRegularizer(module, torch.randn(1, 3, 8, 8), threshold=0.5)
    assert sorted(b.parameter for b in reg.bindings) == ["bn1.weight", "bn2.weight", "stem.1.weight"]
    assert reg.spec.gather.shape[0] == 2  # stem and bn2 regularize the same classes
    out = reg()
    out.regularization.backward()
    value, cost, grads = ort_reference(reg)
    assert float(out.regularization) == pytest.approx(value, rel=1e-5)
    assert float(out.cost) == pytest.approx(cost, rel=1e-5) == reg.total_cost
    # Tied sources (all scales 1) share the gradient equally, as onnxruntime's Max gradient does.
    for binding, param in zip(reg.bindings, reg.source_parameters()):
        np.testing.assert_allclose(param.grad.numpy(), grads[binding.initializer], rtol=1e-5)
    assert (module.stem[1].weight.grad == module.bn2.weight.grad).all()


def test_follows_training_without_reexport_and_ddp_wrapper_is_seen_through():
    torch.manual_seed(0)
    module = TinyResNet()
    reg = MorphNetRegularizer(module, torch.randn(1, 3, 8, 8), threshold=0.5)
    before = reg()
    assert before.alive_channels == reg.graph.num_classes  # every scale is 1
    with torch.no_grad():
        module.bn1.weight[:10] = 0.1
    after = reg()
    assert after.alive_channels == before.alive_channels - 10
    assert float(after.cost) < float(before.cost)
    assert reg.alive_counts()["/conv1/Conv"] == 6
    values = {b.initializer: p.detach().numpy() for b, p in zip(reg.bindings, reg.source_parameters())}
    assert float(after.cost) == pytest.approx(reg.spec.evaluate(values)[0], rel=1e-6)

    class Wrapper(nn.Module):  # stands for DDP's `.module` indirection without a process group
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    compiled_like = Wrapper(module)
    compiled_like._orig_mod = module
    wrapped = MorphNetRegularizer(compiled_like, torch.randn(1, 3, 8, 8), threshold=0.5)
    assert wrapped.source_parameters()[0] is reg.source_parameters()[0]


def test_constant_source_is_refused_by_name():
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(OptionError, match=r"'/1/Constant_output_0' \(of node /1/BatchNormalization.*blacklist"):
        MorphNetRegularizer(module, torch.randn(1, 3, 8, 8))
    reg = MorphNetRegularizer(module, torch.randn(1, 3, 8, 8), blacklist=["/1/BatchNormalization"])
    assert [b.parameter for b in reg.bindings] == ["4.weight"]


def test_no_batchnorm_is_a_clear_error():
    factory, shape = zoo.ZOO["TransformerBlock"]
    with pytest.raises(OptionError, match="the ONNX export of TransformerBlock: no BatchNormalization scale"):
        MorphNetRegularizer(factory(), torch.randn(*shape))
    with pytest.raises(OptionError, match="unknown cost"):
        MorphNetRegularizer(factory(), torch.randn(*shape), regularizer="group-lasso", cost="memory")


def test_structure_and_prune_in_two_calls(tmp_path):
    torch.manual_seed(0)
    module = TinyResNet()
    x = torch.randn(2, 3, 8, 8)
    reg = MorphNetRegularizer(module, x[:1], threshold=0.5)
    with torch.no_grad():  # what training with the regularizer would do: some scales collapse
        module.bn1.weight[3:13] = 0.01
        module.stem[1].weight[:3] = 0.02
        module.bn2.weight[:5] = 0.03
    structure = export_structure(reg, tmp_path / "structure.json")
    assert structure == {"/stem/stem.0/Conv": 5, "/conv1/Conv": 6, "/conv2/Conv": 5, "/head/Gemm": 4}
    document = json.loads((tmp_path / "structure.json").read_text())
    assert document["modules"] == {"stem.0": 5, "conv1": 6, "conv2": 5, "head": 4}

    result = prune_module(reg, tmp_path / "small.onnx")
    assert result.after.flops == pytest.approx(float(reg().cost))
    small = onnx.load(str(tmp_path / "small.onnx"))
    widths = {t.name.split("::")[0]: list(t.dims) for t in small.graph.initializer}
    assert widths["conv1.weight"] == [6, 5, 3, 3] and widths["head.weight"] == [4, 5]
    # The pruned model computes what the module computes (the removed channels were ~0 after BN,
    # except for their bias, which the surgery folds or keeps).
    session = onnxruntime().InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    assert result.masked_deviation.max_rel < 1e-5
    module.eval()
    with torch.no_grad():
        expected = module(x[:1]).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_prune_module_calibrates_batchnorm_after_dropped_constants():
    """Dead channels with a non-zero beta hold relu(beta), which `prune` cannot fold into a padded
    conv; measured BatchNorm statistics absorb most of the shift."""
    from onnx_morph.rewrite.surgery.calibrate import recalibrated_batchnorm

    torch.manual_seed(0)
    module = TinyResNet()
    calibration = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    with torch.no_grad():
        for bn in (module.stem[1], module.bn1, module.bn2):
            bn.bias.uniform_(-0.5, 0.5)
        module.bn1.weight[3:13] = 0.01
        module.stem[1].weight[:3] = 0.02
    reg = MorphNetRegularizer(module, calibration[0][:1], threshold=0.5)
    x = torch.randn(16, 3, 64, 64)
    ort = onnxruntime()

    def run(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    zeroed = reg.zeroed_copy()
    assert (zeroed.bn1.weight[3:13] == 0).all() and (module.bn1.weight[3:13] == 0.01).all()
    zeroed.eval()
    with torch.no_grad():
        expected = zeroed(x).numpy()
    plain = prune_module(reg)
    assert "--calibrate" in plain.notes[-1]
    dropped = np.abs(run(plain.model) - expected).max() / np.abs(expected).max()
    calibrated = prune_module(reg, calibration=calibration)
    assert calibrated.notes[-1] == "BatchNorm statistics measured on 32 calibration inputs"
    export = export_onnx(zeroed, x[:1], input_names=["x"], output_names=["y"],
                         dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    reference = run(recalibrated_batchnorm(export, [b.numpy() for b in calibration], "x"))
    remaining = np.abs(run(calibrated.model) - reference).max() / np.abs(reference).max()
    assert dropped > 0.1 and remaining < 0.05 and remaining < dropped / 3, (dropped, remaining)


def test_batchnorm_calibration_measures_training_mode_statistics():
    """recalibrated_batchnorm (used by prune_module) measures what torch measures in training mode.
    (With onnxruntime's graph optimizations on, some training-mode BatchNorms were normalized by
    their running statistics; the pruned TinyResNet of the test above showed it, this model does not.)"""
    from onnx_morph.rewrite.surgery.calibrate import recalibrated_batchnorm

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    with torch.no_grad():
        for bn in (module[1], module[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(2, 3)
    batch = torch.randn(16, 3, 12, 12)
    model = export_onnx(module, batch, input_names=["x"])
    calibrated = recalibrated_batchnorm(model, [batch.numpy()], "x")
    stats = {t.name: numpy_helper.to_array(t) for t in calibrated.graph.initializer}
    second = [n for n in calibrated.graph.node if n.op_type == "BatchNormalization"][1]
    for bn in (module[1], module[4]):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative: after one batch, that batch's statistics
    module.train()
    with torch.no_grad():
        module(batch)
    n = 16 * 12 * 12
    np.testing.assert_allclose(stats[second.input[3]], module[4].running_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(stats[second.input[4]], module[4].running_var.numpy() * (n - 1) / n, rtol=1e-4)


# --------------------------------------------------------------------------- #
# DDP: 2 gloo processes on CPU agree with each other and with one process.
# --------------------------------------------------------------------------- #

STEPS = 6


def train_steps(module: nn.Module, reg: MorphNetRegularizer, model_for_step: nn.Module) -> list[dict]:
    """A few SGD steps on a fixed batch (the same on every rank, so DDP's averaged gradient equals
    one process's); returns per step the regularization, cost and structure."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 8, 8, generator=generator)
    y = torch.randint(0, 4, (8,), generator=generator)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    history = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        out = reg()
        loss = F.cross_entropy(model_for_step(x), y) + 2e-5 * out.regularization
        loss.backward()
        optimizer.step()
        history.append({"reg": float(out.regularization), "cost": float(out.cost),
                        "structure": reg.alive_counts(out.alive)})
    return history


def make_ddp_model() -> nn.Module:
    torch.manual_seed(0)
    module = TinyResNet()
    with torch.no_grad():
        for bn in (module.stem[1], module.bn1, module.bn2):
            bn.weight.uniform_(0.0, 0.3)
    return module


def ddp_worker(rank: int, world: int, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        module = make_ddp_model()
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        reg = MorphNetRegularizer(ddp, torch.randn(1, 3, 8, 8), threshold=0.1)
        history = train_steps(ddp.module, reg, ddp)
        with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
            json.dump(history, f)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # gloo's background threads can abort the interpreter's own teardown on a loaded machine
    # ("terminate called without an active exception"); the results are already on disk.
    os._exit(0)


def test_ddp_two_processes_agree_with_one(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    try:
        module = make_ddp_model()
        reg = MorphNetRegularizer(module, torch.randn(1, 3, 8, 8), threshold=0.1)
        single = train_steps(module, reg, module)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as rendezvous_dir:
        mp.spawn(ddp_worker, args=(2, os.path.join(rendezvous_dir, "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for step, (ddp_step, one) in enumerate(zip(ranks[0], single)):
        assert ddp_step["structure"] == one["structure"], f"step {step}"
        assert ddp_step["cost"] == one["cost"]
        assert ddp_step["reg"] == pytest.approx(one["reg"], rel=1e-6)
    # The run is not trivial: the regularizer killed channels along the way.
    assert sum(single[-1]["structure"].values()) < sum(single[0]["structure"].values())
