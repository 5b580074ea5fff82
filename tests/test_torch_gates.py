"""onnx_morph.torch with probabilistic gates (FiGS): the torch term against the numpy regularizer, the hooks'
eval and training masks, a real training that closes gates, and pruning to the gated module's function."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnx_morph.data import load_dataset
from onnx_morph.errors import OptionError
from onnx_morph.rewrite.training.regularizer import GATE_LOGIT, GATE_LOGIT_SCALE
from onnx_morph.rewrite.surgery.verify import onnxruntime
from onnx_morph.torch import MorphNetRegularizer, export_onnx, prune_module

try:
    from test_gates import GateNet, bn_gate_net
except ImportError:  # tests/ turned into a package
    from tests.test_gates import GateNet, bn_gate_net

X = torch.zeros(1, 1, 8, 8)


def masked_forward(net: GateNet, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """GateNet's function with each producer's output multiplied by its mask (stem, body, back)."""
    stem, body, back = (m.reshape(1, -1, 1, 1) for m in masks)
    s = torch.relu(net.stem(x) * stem)
    s = torch.relu(s + net.back(torch.relu(net.body(s) * body)) * back)
    return net.head(torch.flatten(net.pool(s), 1))


def set_logits(reg: MorphNetRegularizer, logits: list[np.ndarray]) -> None:
    with torch.no_grad():
        for gate, parameter, value in zip(reg.spec.gates, reg.gate_parameters(), logits):
            parameter.copy_(torch.as_tensor(value / gate.logit_scale, dtype=parameter.dtype))


def stored(reg: MorphNetRegularizer) -> dict[str, np.ndarray]:
    return {g.param: p.detach().numpy() for g, p in zip(reg.spec.gates, reg.gate_parameters())}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("cost", ["flops", "params"])
def test_term_matches_the_numpy_regularizer(cost):
    """Random logits set by hand: term, effective cost, alive and vector are `spec.evaluate` / `spec.vector`,
    and the residual class's two gates combine by 1 - (1 - p1)(1 - p2), not by max."""
    torch.manual_seed(0)
    reg = MorphNetRegularizer(GateNet(), X, regularizer="gates", cost=cost)
    assert [g.node for g in reg.spec.gates] == ["/stem/Conv", "/body/Conv", "/back/Conv"]
    assert list(reg.gate_modules.values()) == ["stem", "body", "back"]
    assert reg.source_parameters() == reg.gate_parameters() and len(reg.gate_parameters()) == 3
    for parameter in reg.gate_parameters():
        np.testing.assert_allclose(parameter.detach().numpy(), GATE_LOGIT / GATE_LOGIT_SCALE)
    assert float(reg().cost) == pytest.approx(reg.total_cost, rel=1e-6)

    rng = np.random.default_rng(0)
    logits = [rng.normal(0.0, 2.0, g.channels) for g in reg.spec.gates]
    set_logits(reg, logits)
    out = reg()
    want_cost, want_reg = reg.spec.evaluate(stored(reg))
    vector = reg.spec.vector(stored(reg))
    assert float(out.cost) == pytest.approx(want_cost, rel=1e-5)
    assert out.regularization.item() == pytest.approx(want_reg, rel=1e-5)
    assert out.alive.numpy().tolist() == reg.spec.alive(vector)[:-1].tolist()
    assert want_cost < reg.total_cost and 0 < out.alive_channels < out.alive.numel()
    np.testing.assert_allclose(reg.vector(), vector[:-1], rtol=1e-5)

    p = [1 / (1 + np.exp(-(value / GATE_LOGIT_SCALE).astype(np.float32).astype(np.float64) * GATE_LOGIT_SCALE))
         for value in logits]
    tied = reg.graph.classes(reg.spec.gates[0].tensor)
    np.testing.assert_allclose(reg.vector()[tied], 1 - (1 - p[0]) * (1 - p[2]), rtol=1e-5)
    assert np.abs(reg.vector()[tied] - np.maximum(p[0], p[2])).max() > 1e-2

    out.regularization.backward()
    assert all(parameter.grad.abs().max() > 0 for parameter in reg.gate_parameters())


def test_pruning_keeps_only_open_channels():
    """A channel whose gates are all closed is zero in eval mode: kept() drops it even while its
    probability (>= 0.1) counts it alive; one open gate on a residual channel keeps it."""
    reg = MorphNetRegularizer(GateNet(), X, regularizer="gates")
    set_logits(reg, [np.array([1.0, -1.0, -5.0, -1.0, -5, -5, -5, -5]), np.array([-1.0] * 4 + [2.0] * 12),
                     np.array([-5.0, 1.0, -1.0, -5.0, -5, -5, -5, -5])])
    stream, inner = (reg.graph.classes(g.tensor) for g in reg.spec.gates[:2])
    alive, kept = reg().alive.numpy(), reg.kept()
    assert alive[stream].tolist() == [True] * 4 + [False] * 4
    assert kept[stream].tolist() == [True] * 2 + [False] * 6
    assert alive[inner].all() and kept[inner].tolist() == [False] * 4 + [True] * 12
    assert reg.alive_counts(kept) == {"/stem/Conv": 2, "/body/Conv": 12, "/back/Conv": 2, "/head/Gemm": 10}


def test_eval_masks_by_open_gates_and_training_samples():
    torch.manual_seed(0)
    module = GateNet()
    plain = copy.deepcopy(module)
    x = torch.randn(8, 1, 8, 8)
    reg = MorphNetRegularizer(module, X, regularizer="gates")
    logits = [np.where(np.arange(g.channels) % 3 == 0, -1.0, 1.5) for g in reg.spec.gates]
    set_logits(reg, logits)

    module.eval()
    with torch.no_grad():
        first, second = module(x), module(x)
        want = masked_forward(plain, x, [torch.as_tensor(v > 0, dtype=torch.float32) for v in logits])
        ungated = plain(x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, want, rtol=1e-6, atol=1e-6)
    assert (first - ungated).abs().max() > 1e-3
    exported = export_onnx(module, X)  # the eval masks are constants of the export
    session = onnxruntime().InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0], first[:1].numpy(),
                               rtol=1e-5, atol=1e-6)

    module.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert (module(x) - module(x)).abs().max() > 1e-4

    reg.remove()
    with torch.no_grad():
        torch.testing.assert_close(module(x), ungated)


def test_straight_through_is_hard_forward_with_the_soft_gradient():
    torch.manual_seed(0)
    module = GateNet()
    plain = copy.deepcopy(module)
    x = torch.randn(4, 1, 8, 8)
    reg = MorphNetRegularizer(module, X, regularizer="gates", straight_through=True, gate_temperature=0.3)
    set_logits(reg, [np.zeros(g.channels) for g in reg.spec.gates])  # p = 0.5: about half the samples close
    seen = []
    module.stem.register_forward_hook(lambda m, i, o: seen.append(o.detach()))  # runs after the gate's hook
    module.train()
    torch.manual_seed(2)
    F.cross_entropy(module(x), torch.zeros(4, dtype=torch.long)).backward()
    module(x)
    with torch.no_grad():
        ungated = plain.stem(x)
    for output in seen:
        kept = (output - ungated).abs().amax((0, 2, 3)) < 1e-6
        closed = output.abs().amax((0, 2, 3)) == 0
        assert (kept | closed).all() and closed.any() and kept.any()
    assert not torch.equal(seen[0], seen[1])
    assert all(parameter.grad.abs().max() > 0 for parameter in reg.gate_parameters())


@pytest.fixture(scope="module")
def trained(digits):
    """GateNet trained with gates for ~270 steps: (module, regularizer, initial effective cost, final)."""
    torch.manual_seed(0)
    module = GateNet()
    reg = MorphNetRegularizer(module, X, regularizer="gates", cost="flops")
    optimizer = torch.optim.AdamW(list(module.parameters()) + reg.gate_parameters(), lr=5e-3)
    strength = 3.0 / reg().regularization.item()
    x, y = torch.as_tensor(digits.x_train), torch.as_tensor(digits.y_train)
    initial = float(reg().cost)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only contends with other jobs
    module.train()
    try:
        for _ in range(3):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x) - 15, 16):
                batch = order[start:start + 16]
                loss = F.cross_entropy(module(x[batch]), y[batch]) + strength * reg().regularization
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    module.eval()
    return module, reg, initial, float(reg().cost)


def test_training_shrinks_the_effective_flops(trained, digits):
    module, reg, initial, final = trained
    assert initial == pytest.approx(reg.total_cost)
    assert final < 0.8 * initial, final / initial
    with torch.no_grad():
        predicted = module(torch.as_tensor(digits.x_test)).argmax(1).numpy()
    assert (predicted == digits.y_test).mean() > 0.5


def test_prune_module_equals_the_gated_module(trained, digits):
    module, reg, _, final = trained
    x = torch.as_tensor(digits.x_test[:64])
    with torch.no_grad():
        want = module(x).numpy()
    state = copy.deepcopy(module.state_dict())

    twin = reg.zeroed_copy()
    assert not any(m._forward_hooks for m in twin.modules())
    assert any(m._forward_hooks for m in module.modules())
    result = prune_module(reg)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert result.after.flops < 0.8 * result.before.flops
    assert result.after.flops <= final * (1 + 1e-9)
    assert not [n.name for n in result.model.graph.node if n.op_type == "Mul"]
    session = onnxruntime().InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


class BufferStem(nn.Module):
    """The stem conv's weight is a buffer: the exported initializer maps to no parameter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stem", torch.randn(8, 1, 3, 3))
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = torch.relu(F.conv2d(x, self.stem, padding=1))
        return self.head(torch.flatten(torch.relu(self.body(x)), 1))


def test_refusals():
    with pytest.raises(OptionError, match="apply to the gates regularizer, not to 'group-lasso'"):
        MorphNetRegularizer(GateNet(), X, regularizer="group-lasso", straight_through=True)
    with pytest.raises(OptionError, match="gate temperature"):
        MorphNetRegularizer(GateNet(), X, regularizer="gates", gate_temperature=0.0)
    with pytest.raises(OptionError, match=r"gate on node /Conv .*BufferStem.*blacklist=\['/Conv'\]"):
        MorphNetRegularizer(BufferStem(), X, regularizer="gates")
    reg = MorphNetRegularizer(BufferStem(), X, regularizer="gates", blacklist=["/Conv"])
    assert list(reg.gate_modules.values()) == ["body"]


def test_gates_everywhere_hook_the_batchnorm_and_prune_to_it():
    """On a BatchNorm network the gate sits after the BatchNorm module, and folds into its scale and shift."""
    net = bn_gate_net()
    first = MorphNetRegularizer(net, X, regularizer="gates")
    assert list(first.gate_modules.values()) == ["3"]
    with pytest.raises(OptionError, match="gate hooks of another MorphNetRegularizer"):
        MorphNetRegularizer(net, X, regularizer="gates", gates_everywhere=True)
    first.remove()
    reg = MorphNetRegularizer(net, X, regularizer="gates", gates_everywhere=True)
    assert list(reg.gate_modules.values()) == ["1", "3"]
    set_logits(reg, [np.array([-1.0, 2.0] * (g.channels // 2)) for g in reg.spec.gates])
    net.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = net(x).numpy()
    result = prune_module(reg)
    assert result.after.flops < 0.5 * result.before.flops
    session = onnxruntime().InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
