"""Transformers: MLP hidden units and whole attention heads are prunable channels.

Three real exports: torchvision's VisionTransformer at vit_b_16's width (12 heads of 64, MLP 3072; 2
layers, 64x64 images), whose nn.MultiheadAttention fuses Q, K and V into one 3E projection that is
split by Reshape/Transpose/Gather, a small BERT-style encoder with separate Q/K/V Linear layers, and
a timm-style ViT whose qkv Linear(E, 3E) is viewed as (B, N, 3, H, D), permuted and unbound.
Heads and MLP units are removed by `prune --mask`; the result must compute what the torch module
computes with those heads' and units' weights set to zero.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from tools.zoo import import_torchvision

import onnx_morph
from onnx_morph.costs import op_costs, totals_of
from onnx_morph.graph import load_model
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.training.artifacts import make_training_artifacts
from onnx_morph.rewrite.training.regularizer import RegularizerOptions
from onnx_morph.rewrite.surgery.select import mask_document
from onnx_morph.rewrite.surgery.verify import onnxruntime

REL_TOL = 1e-4


class SelfAttention(nn.Module):
    """BERT's self-attention: separate Q/K/V projections, heads split by view + transpose."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, e = x.shape

        def split(z):
            return z.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.output((weights @ v).transpose(1, 2).reshape(b, t, e))


class EncoderLayer(nn.Module):
    """Post-LN as in BERT: x = LN(x + attention(x)); x = LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.attention_norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.mlp_norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.attention_norm(x + self.attention(x))
        return self.mlp_norm(x + self.fc2(nn.functional.gelu(self.fc1(x))))


class TinyBert(nn.Module):
    """Token + position embeddings -> LayerNorm -> encoder layers -> tanh pooler on token 0 -> classes."""

    def __init__(self, vocab=50, tokens=8, dim=64, heads=4, hidden=128, layers=2, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.embedding_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden) for _ in range(layers))
        self.pooler, self.classifier = nn.Linear(dim, dim), nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embedding_norm(self.embedding(tokens) + self.position)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


BERT = {"tokens": 8, "dim": 64, "heads": 4, "hidden": 128, "layers": 2, "vocab": 50}
VIT = {"image_size": 64, "patch_size": 16, "num_layers": 2, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072}


def _export(module: nn.Module, example: torch.Tensor, path, dynamic_batch: bool = False):
    """TorchScript export with the repo's settings (tools/zoo.py), opset 17 (GELU as Erf, LayerNormalization)."""
    module.eval()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                              input_names=["input"], output_names=["output"], dynamic_axes=axes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def _bert() -> TinyBert:
    torch.manual_seed(0)
    return TinyBert(**{k: BERT[k] for k in ("vocab", "tokens", "dim", "heads", "hidden", "layers")})


def _bert_tokens(rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    return rng.integers(0, BERT["vocab"], size=(batch, BERT["tokens"])).astype(np.int64)


def _vit():
    torchvision = import_torchvision()
    torch.manual_seed(0)
    module = torchvision.models.vision_transformer.VisionTransformer(**VIT, num_classes=10)
    with torch.no_grad():  # the classifier starts at zero: every output, and every comparison, would be 0
        module.heads.head.weight.normal_(0.0, 0.02)
    return module


def _vit_images(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 3, VIT["image_size"], VIT["image_size"])).astype(np.float32)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return _export(_bert(), torch.from_numpy(_bert_tokens(np.random.default_rng(0))), tmp_path_factory.mktemp("bert") / "bert.onnx")


@pytest.fixture(scope="module")
def vit_path(tmp_path_factory):
    side = VIT["image_size"]
    return _export(_vit(), torch.randn(1, 3, side, side), tmp_path_factory.mktemp("vit") / "vit.onnx")


def _node(graph, *fragments: str) -> str:
    *inside, last = fragments
    matches = [n for n in graph.nodes if n.endswith(last) and all(f in n for f in inside)]
    assert len(matches) == 1, (fragments, matches)
    return matches[0]


def _output_classes(graph, *fragments: str) -> np.ndarray:
    return graph.classes(graph.nodes[_node(graph, *fragments)].output[0])


# Per model: the node producing layer i's Q (fused QKV for ViT) and its MLP hidden layer.
LAYOUT = {
    "bert": (lambda i: (f"layers.{i}/", "query/MatMul"), lambda i: (f"layers.{i}/", "fc1/MatMul")),
    "vit": (lambda i: (f"encoder_layer_{i}/", "self_attention/MatMul"), lambda i: (f"encoder_layer_{i}/", "mlp.0/MatMul")),
}


def _shape(name: str) -> tuple[int, int, int, int]:
    """(layers, heads, head dim, MLP width)."""
    if name == "bert":
        return BERT["layers"], BERT["heads"], BERT["dim"] // BERT["heads"], BERT["hidden"]
    return VIT["num_layers"], VIT["num_heads"], VIT["hidden_dim"] // VIT["num_heads"], VIT["mlp_dim"]


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_every_head_and_mlp_unit_is_a_prunable_channel(name, request):
    result = onnx_morph.analyze(request.getfixturevalue(f"{name}_path"))
    graph = result.graph
    layers, heads, head_dim, hidden = _shape(name)
    prunable = [g for g in result.groups if g.prunable]
    pooler = [BERT["dim"]] if name == "bert" else []  # BERT's pooler is a Linear -> tanh -> Linear MLP
    assert sorted(g.size for g in prunable) == sorted([heads] * layers + [hidden] * layers + pooler)
    query, mlp = LAYOUT[name]
    for i in range(layers):
        q = _output_classes(graph, *query(i))[: heads * head_dim]
        assert np.unique(q).size == heads  # one class per head ...
        assert all(np.unique(q[h * head_dim:(h + 1) * head_dim]).size == 1 for h in range(heads))  # ... of D dims
        assert np.unique(_output_classes(graph, *mlp(i))).size == hidden
    pinned = [g for g in result.groups if not g.prunable]
    assert all(g.pin_reasons for g in pinned)
    embedding = max(pinned, key=lambda g: g.size)  # the residual stream, tied to every LayerNorm
    assert any("LayerNormalization" in r for r in embedding.pin_reasons)


def _choose(graph, name: str, seed: int) -> tuple[np.ndarray, dict[int, list[int]], dict[int, list[int]]]:
    """Alive classes with random heads and MLP units of every layer removed; and which ones, per layer."""
    rng = np.random.default_rng(seed)
    layers, heads, head_dim, hidden = _shape(name)
    query, mlp = LAYOUT[name]
    alive = np.ones(graph.num_classes, dtype=bool)
    dead_heads, dead_units = {}, {}
    for i in range(layers):
        dead_heads[i] = sorted(rng.choice(heads, size=heads // 3 + i, replace=False).tolist())
        dead_units[i] = sorted(rng.choice(hidden, size=hidden // 4, replace=False).tolist())
        q = _output_classes(graph, *query(i))
        alive[q[[h * head_dim for h in dead_heads[i]]]] = False
        alive[_output_classes(graph, *mlp(i))[dead_units[i]]] = False
    return alive, dead_heads, dead_units


def _zero_bert(module: TinyBert, dead_heads, dead_units) -> None:
    head_dim = BERT["dim"] // BERT["heads"]
    with torch.no_grad():
        for i, layer in enumerate(module.layers):
            for h in dead_heads[i]:
                for projection in (layer.attention.query, layer.attention.key, layer.attention.value):
                    projection.weight[h * head_dim:(h + 1) * head_dim] = 0
                    projection.bias[h * head_dim:(h + 1) * head_dim] = 0
            layer.fc1.weight[dead_units[i]] = 0
            layer.fc1.bias[dead_units[i]] = 0


def _zero_vit(module, dead_heads, dead_units) -> None:
    dim, head_dim = VIT["hidden_dim"], VIT["hidden_dim"] // VIT["num_heads"]
    with torch.no_grad():
        for i, layer in enumerate(module.encoder.layers):
            attention = layer.self_attention
            for h in dead_heads[i]:
                for part in range(3):  # Q, K, V rows of the fused projection
                    rows = slice(part * dim + h * head_dim, part * dim + (h + 1) * head_dim)
                    attention.in_proj_weight[rows] = 0
                    attention.in_proj_bias[rows] = 0
            layer.mlp[0].weight[dead_units[i]] = 0
            layer.mlp[0].bias[dead_units[i]] = 0


def _torch_outputs(module: nn.Module, inputs: list[np.ndarray]) -> list[np.ndarray]:
    module.eval()
    with torch.no_grad():
        return [module(torch.from_numpy(x)).numpy() for x in inputs]


def _ort_outputs(model: onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, {"input": x})[0] for x in inputs]


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_pruned_heads_and_units_equal_the_zeroed_torch_module(name, request):
    path = request.getfixturevalue(f"{name}_path")
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    alive, dead_heads, dead_units = _choose(graph, name, seed=7)
    result = prune(path, Mask(mask_document(graph, alive)))
    assert result.removed_channels == int((~alive).sum())
    assert result.masked_deviation.max_rel < REL_TOL
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)

    rng = np.random.default_rng(123)
    inputs = [_bert_tokens(rng) for _ in range(3)] if name == "bert" else [_vit_images(rng) for _ in range(2)]
    module = _bert() if name == "bert" else _vit()
    (_zero_bert if name == "bert" else _zero_vit)(module, dead_heads, dead_units)
    expected, actual = _torch_outputs(module, inputs), _ort_outputs(pruned, inputs)
    for e, a in zip(expected, actual):
        assert np.abs(e).max() > 0
        assert np.abs(e - a).max() / np.abs(e).max() < REL_TOL

    layers, heads, head_dim, hidden = _shape(name)
    after = onnx_morph.analyze(pruned)
    kept_heads = [heads - len(dead_heads[i]) for i in range(layers)]
    kept_units = [hidden - len(dead_units[i]) for i in range(layers)]
    pooler = [BERT["dim"]] if name == "bert" else []
    assert sorted(g.size for g in after.groups if g.prunable) == sorted(kept_heads + kept_units + pooler)
    assert after.total.flops == totals_of(op_costs(graph, alive)).flops < analysis.total.flops
    _check_head_reshapes(pruned, name, kept_heads, heads, head_dim)


def _check_head_reshapes(pruned: onnx.ModelProto, name: str, kept_heads: list[int], heads: int, head_dim: int) -> None:
    """Every Reshape that splits out heads ([.., H, .., D]) now has the layer's surviving head count."""
    shapes = load_model(pruned).shapes
    prefix = "layers.{}/" if name == "bert" else "encoder_layer_{}/"
    for i, kept in enumerate(kept_heads):
        splits = [n for n in pruned.graph.node if n.op_type == "Reshape" and prefix.format(i) in n.name
                  and len(shapes[n.output[0]]) >= 3 and shapes[n.output[0]][-1] == head_dim]
        assert len(splits) >= 3, [n.name for n in splits]  # Q, K and V
        for node in splits:
            dims = shapes[node.output[0]][:-1]
            assert kept in dims and heads not in dims, (node.name, dims)


@pytest.fixture(scope="module")
def dynamic_bert_path(tmp_path_factory):
    return _export(_bert(), torch.from_numpy(_bert_tokens(np.random.default_rng(0))),
                   tmp_path_factory.mktemp("bert_dynamic") / "bert.onnx", dynamic_batch=True)


def test_pruned_bert_keeps_its_dynamic_batch(dynamic_bert_path):
    """Head reshapes exported as view(b, t, H, D) keep b from the input, not the batch of 1 analyzed."""
    graph = onnx_morph.analyze(dynamic_bert_path).graph
    alive, dead_heads, dead_units = _choose(graph, "bert", seed=3)
    pruned = prune(dynamic_bert_path, Mask(mask_document(graph, alive))).model
    module = _bert()
    _zero_bert(module, dead_heads, dead_units)
    tokens = [_bert_tokens(np.random.default_rng(5), batch=3)]
    expected, actual = _torch_outputs(module, tokens)[0], _ort_outputs(pruned, tokens)[0]
    assert actual.shape == (3, 3)
    assert np.abs(expected - actual).max() / np.abs(expected).max() < REL_TOL


def test_group_lasso_trains_on_bert(dynamic_bert_path, tmp_path):
    from onnxruntime.training import api

    path = dynamic_bert_path
    options = RegularizerOptions(kind="group-lasso", cost="flops")
    artifacts = make_training_artifacts(path, tmp_path / "run", regularizer=options, batch_size=4)
    assert artifacts.initial_regularization > 0

    state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    module = api.Module(str(artifacts.training_model), state, str(artifacts.eval_model))
    optimizer = api.Optimizer(str(artifacts.optimizer_model), module)
    module.train()
    rng = np.random.default_rng(1)
    feeds = {artifacts.inputs[0]: _bert_tokens(rng, batch=4), artifacts.labels: rng.integers(0, 3, 4).astype(np.int64),
             "morph_strength": np.array(artifacts.strength, np.float32)}
    inputs = [feeds[n] for n in module.input_names()]
    loss, *_ = module(*inputs)
    optimizer.step()
    module.lazy_reset_grad()
    assert np.isfinite(loss) and loss > 0
    assert float(module(*inputs)[0]) != float(loss)  # the step changed the weights


def test_a_head_split_without_attention_stays_pinned(tmp_path):
    """Heads split and merged with nothing tying each head's dimensions: any one dimension could die,
    and a reshape cannot express that, so the grid is pinned with the reshape's name."""

    class SplitMerge(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            b, t, e = x.shape
            heads = torch.relu(self.up(x)).view(b, t, 4, 4).transpose(1, 2)
            return self.down(heads.transpose(1, 2).reshape(b, t, e))

    torch.manual_seed(0)
    result = onnx_morph.analyze(_export(SplitMerge(), torch.randn(1, 6, 16), tmp_path / "split.onnx"))
    hidden = [g for g in result.groups if "/up/" in " ".join(g.producers)]
    assert len(hidden) == 1 and not hidden[0].prunable
    assert any("Reshape" in r and "splits the channels over axes" in r for r in hidden[0].pin_reasons)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_expand_widens_mlps_and_keeps_the_heads(name, request):
    """MorphNet's expansion on a transformer: MLP widths follow the multiplier, the head count stays."""
    from onnx_morph.rewrite.surgery.expand import expand

    path = request.getfixturevalue(f"{name}_path")
    before = onnx_morph.analyze(path).total.flops
    result = expand(path, target_flops=1.3 * before)
    assert result.after.flops <= 1.3 * before
    assert any("attention heads keep their head count" in note for note in result.notes)
    changed = [w for w in result.widths if w.after != w.before]
    assert all(w.after > w.before for w in changed)
    assert sum("fc1" in w.node or "mlp.0" in w.node for w in changed) == 2  # both layers' MLPs (BERT's pooler too)
    rng = np.random.default_rng(0)
    inputs = [_bert_tokens(rng) if name == "bert" else _vit_images(rng)]
    assert [o.shape for o in _ort_outputs(result.model, inputs)] == [o.shape for o in _ort_outputs(onnx.load(str(path)), inputs)]


class FusedQkvAttention(nn.Module):
    """timm's Attention: qkv Linear(E, 3E) -> reshape(B, N, 3, H, D) -> permute(2, 0, 3, 1, 4) -> q, k, v
    taken by unbind (Split + Squeeze), indexing (Gather) or split (Split + Squeeze)."""

    def __init__(self, dim: int, heads: int, take: str):
        super().__init__()
        self.heads, self.head_dim, self.take = heads, dim // heads, take
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, e = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.take == "unbind":
            q, k, v = qkv.unbind(0)
        elif self.take == "index":
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = (t.squeeze(0) for t in qkv.split(1, dim=0))
        weights = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, e))


class TimmBlock(nn.Module):
    """Pre-LN: x += attention(LN(x)); x += fc2(gelu(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, hidden: int, take: str):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), FusedQkvAttention(dim, heads, take)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


TIMM = {"dim": 32, "heads": 4, "hidden": 64, "layers": 2, "patch": 4, "side": 16}


class TinyTimmViT(nn.Module):
    """Patch conv -> blocks -> LayerNorm -> mean over tokens -> classes."""

    def __init__(self, take: str):
        super().__init__()
        dim = TIMM["dim"]
        self.patch = nn.Conv2d(3, dim, TIMM["patch"], TIMM["patch"])
        self.blocks = nn.ModuleList(TimmBlock(dim, TIMM["heads"], TIMM["hidden"], take) for _ in range(TIMM["layers"]))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def _timm_vit(take: str) -> TinyTimmViT:
    torch.manual_seed(0)
    return TinyTimmViT(take)


def _timm_images(rng: np.random.Generator, batch: int) -> np.ndarray:
    return rng.standard_normal((batch, 3, TIMM["side"], TIMM["side"])).astype(np.float32)


def _export_dynamo(module: nn.Module, example: torch.Tensor, path):
    """The default exporter (torch >= 2.9, onnxscript), dynamic batch."""
    module.eval()
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["input"], output_names=["output"],
                                    dynamic_shapes=({0: batch},))
    program.save(str(path))
    return path


def _timm_path(tmp_path, take: str, exporter: str):
    example = torch.from_numpy(_timm_images(np.random.default_rng(0), 2))
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs the onnxscript package")
        return _export_dynamo(_timm_vit(take), example, tmp_path / "timm.onnx")
    return _export(_timm_vit(take), example, tmp_path / "timm.onnx", dynamic_batch=True)


def _qkv_outputs(graph) -> list[str]:
    """Each layer's fused qkv projection output (3E features), in graph order, found by shape (the
    exporters name nodes differently)."""
    three = 3 * TIMM["dim"]
    found = [r.geometry.output for name in graph.order if (r := graph.relations.get(name)) is not None
             and r.geometry is not None and r.geometry.weight is not None
             and graph.tensors[r.geometry.output].shape[-1] == three]
    assert len(found) == TIMM["layers"], found
    return found


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("take", ["unbind", "index", "split"])
def test_fused_qkv_heads_prune_whole(take, exporter, tmp_path):
    """timm-style fused qkv attention: one group of H heads per layer; pruning some heads equals the
    torch module with those heads' q, k and v rows zeroed, and the head reshapes are rewritten."""
    path = _timm_path(tmp_path, take, exporter)
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    dim, heads, hidden, layers = TIMM["dim"], TIMM["heads"], TIMM["hidden"], TIMM["layers"]
    head_dim = dim // heads
    assert sorted(g.size for g in analysis.groups if g.prunable) == [heads] * layers + [hidden] * layers
    for g in analysis.groups:
        assert g.prunable or g.pin_reasons
        assert not any("unknown shape" in r or "several channel axes" in r or "splits the channels" in r
                       for r in g.pin_reasons), g.pin_reasons

    rng = np.random.default_rng(11)
    alive = np.ones(graph.num_classes, dtype=bool)
    dead = {}
    for i, qkv in enumerate(_qkv_outputs(graph)):
        classes = graph.classes(qkv).reshape(3, heads, head_dim)
        assert all(np.unique(classes[:, h]).size == 1 for h in range(heads))  # q, k, v of head h: one channel
        assert np.unique(classes[:, :, 0]).size == heads
        dead[i] = sorted(rng.choice(heads, size=1 + i, replace=False).tolist())
        alive[classes[0, dead[i], 0]] = False
    result = prune(path, Mask(mask_document(graph, alive)))
    assert result.removed_channels == sum(map(len, dead.values()))
    assert result.masked_deviation.max_rel < REL_TOL
    onnx.checker.check_model(result.model, full_check=True)
    assert onnx_morph.analyze(result.model).total.flops == totals_of(op_costs(graph, alive)).flops

    module = _timm_vit(take)
    with torch.no_grad():
        for i, block in enumerate(module.blocks):
            for h in dead[i]:
                rows = [part * dim + h * head_dim + d for part in range(3) for d in range(head_dim)]
                block.attn.qkv.weight[rows] = 0
                block.attn.qkv.bias[rows] = 0
    images = [_timm_images(np.random.default_rng(5), batch=3)]
    expected = _torch_outputs(module, images)[0]
    session = onnxruntime().InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: images[0]})[0]
    assert np.abs(expected - actual).max() / np.abs(expected).max() < REL_TOL

    kept = [heads - len(dead[i]) for i in range(layers)]
    shapes = load_model(result.model).shapes
    reshaped = [shapes[n.output[0]] for n in result.model.graph.node if n.op_type == "Reshape"]
    assert [s[-3:] for s in reshaped if len(s) == 5] == [(3, k, head_dim) for k in kept]  # the head splits
    tokens = (TIMM["side"] // TIMM["patch"]) ** 2
    merges = [s[-1] for s in reshaped if len(s) == 3 and s[1] == tokens]  # (B, N, E'), not the patches' (B, E, N)
    assert merges == [k * head_dim for k in kept]  # and the head merges


# Swin: (embed dim, heads, window, image side). The small model's relative position bias (N*N*H
# values per block) is folded by the loader; the large one's (64*64*17 > 65536) is computed at run time.
SWIN = {"folded": (16, [2, 4], 4, 32), "computed": (68, [17], 8, 64)}


def _swin(config: str):
    torchvision = import_torchvision()
    dim, heads, window, _ = SWIN[config]
    torch.manual_seed(0)
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=dim, depths=[2] * len(heads), num_heads=heads, window_size=[window, window],
        num_classes=5)


@pytest.mark.parametrize("config", list(SWIN))
def test_swin_heads_prune_with_their_bias_table_columns(config, tmp_path):
    """Shifted-window attention (Roll, window masks broadcast over heads) with a relative position bias
    gathered per head from a table by constant indices: heads are prunable, surgery slices the table's
    head columns (no materialized bias), and the result equals the module with those heads' q, k and v
    rows zeroed."""
    dim, heads, window, side = SWIN[config]
    path = _export(_swin(config), torch.randn(1, 3, side, side), tmp_path / "swin.onnx")
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    head_groups = [g for g in graph.groups if g.prunable and g.size in heads]
    assert sorted(g.size for g in head_groups) == sorted(h for h in heads for _ in range(2))  # 2 blocks per stage
    assert not any("computed at run time" in r for g in analysis.groups for r in g.pin_reasons)

    alive = np.ones(graph.num_classes, dtype=bool)
    dead = {}  # (stage, block) -> dead heads, in graph order
    for index, group in enumerate(head_groups):
        stage, block = index // 2, index % 2
        dead[stage, block] = [0, group.size - 1] if group.size > 2 else [1]
        qkv = next(t for t in group.tensors if t.endswith(f"features.{2 * stage + 1}.{block}/attn/MatMul_output_0")
                   or t.endswith(f"features.{2 * stage + 1}.{block}/attn/Add_output_0"))
        classes = graph.classes(qkv).reshape(3, group.size, -1)
        alive[classes[0, dead[stage, block], 0]] = False
    result = prune(path, Mask(mask_document(graph, alive)))
    assert result.removed_channels == sum(map(len, dead.values()))
    assert result.masked_deviation.max_rel < REL_TOL
    onnx.checker.check_model(result.model, full_check=True)

    tables = {t.name.split("::")[0]: tuple(t.dims) for t in result.model.graph.initializer if "bias_table" in t.name}
    assert len(tables) == len(dead)
    module = _swin(config)
    with torch.no_grad():
        for (stage, block), gone in dead.items():
            attention = module.features[2 * stage + 1][block].attn
            count = attention.num_heads
            assert tables[f"features.{2 * stage + 1}.{block}.attn.relative_position_bias_table"] == (
                (2 * window - 1) ** 2, count - len(gone))
            rows = torch.arange(3 * dim * 2 ** stage).reshape(3, count, -1)[:, gone].reshape(-1)
            attention.qkv.weight[rows] = 0
            attention.qkv.bias[rows] = 0
    assert not [t.name for t in result.model.graph.initializer if len(t.dims) == 4 and t.dims[-1] == window ** 2]
    images = [np.random.default_rng(3).standard_normal((1, 3, side, side)).astype(np.float32)]
    expected, actual = _torch_outputs(module, images)[0], _ort_outputs(result.model, images)[0]
    assert np.abs(expected - actual).max() / np.abs(expected).max() < REL_TOL


def test_a_computed_constant_that_is_no_view_of_one_parameter_pins_its_channels():
    """A per-channel constant computed at run time from two parameters (too large to fold) cannot be
    sliced at an initializer: its channels stay, with the op's name and why."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    tokens, width = 300, 256  # the sum has 76800 values, more than the loader folds

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["h"], name="up"),
         helper.make_node("Add", ["a", "b"], ["offset"], name="offset_sum"),
         helper.make_node("Add", ["h", "offset"], ["shifted"], name="shift"),
         helper.make_node("MatMul", ["shifted", "w2"], ["output"], name="down")],
        "computed", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, tokens, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, tokens, 8])],
        [init("w1", 8, width), init("a", tokens, width), init("b", tokens, width), init("w2", width, 8)])
    analysis = onnx_morph.analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (hidden,) = [g for g in analysis.groups if g.size == width]
    assert not hidden.prunable
    assert hidden.pin_reasons == ["Add node 'shift' adds per-channel values computed at run time ('offset') that are "
                                  "not one parameter's axis laid out again, so surgery cannot slice them"]
