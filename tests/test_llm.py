"""Decoder LLMs: a Llama/Qwen/Mistral-style decoder (RMSNorm as Pow/ReduceMean/Sqrt/Div/Mul, rotary
embeddings, grouped-query attention, SwiGLU MLP, causal mask, tied embeddings, with and without a KV
cache) and a GPT-2-style one (fused c_attn Conv1D split into q, k, v), built in tools/llm_models.py
with random weights, exported with both exporters, analyzed and pruned with `prune --mask`. The result
must compute what the torch module computes with the removed units' weights set to zero.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from tools.llm_models import GPT2, LLAMA, GPT2Model, Llama

import onnx_morph
from onnx_morph.costs import op_costs, totals_of
from onnx_morph.rewrite import Mask, prune
from onnx_morph.rewrite.surgery.select import mask_document
from onnx_morph.rewrite.surgery.verify import onnxruntime

REL_TOL = 1e-4
TOKENS, PAST = 6, 5
H, KV, D, I = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"], LLAMA["intermediate"]
SERVED = H // KV  # query heads per KV head


def _export(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str], path, exporter: str):
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs the onnxscript package")
            torch.onnx.export(module, args, str(path), dynamo=True, optimize=False, input_names=inputs,
                              output_names=outputs, verbose=False)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                              input_names=inputs, output_names=outputs)
    return path


def _llama(cache: bool = False, interleave: bool = False) -> Llama:
    torch.manual_seed(0)
    return Llama({**LLAMA, "interleave": interleave}, cache=cache)


def _gpt2() -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model()


def _feeds(rng: np.random.Generator, cache: bool) -> dict[str, np.ndarray]:
    feeds = {"input_ids": rng.integers(0, LLAMA["vocab"], (1, TOKENS)).astype(np.int64)}
    if cache:
        for i in range(LLAMA["layers"]):
            for kind in "kv":
                feeds[f"past_{kind}{i}"] = rng.standard_normal((1, KV, PAST, D)).astype(np.float32)
    return feeds


def _names(cache: bool) -> tuple[list[str], list[str]]:
    layers = range(LLAMA["layers"])
    if not cache:
        return ["input_ids"], ["logits"]
    return (["input_ids"] + [f"past_{k}{i}" for i in layers for k in "kv"],
            ["logits"] + [f"present_{k}{i}" for i in layers for k in "kv"])


def _llama_path(tmp_path, exporter: str, cache: bool = False, interleave: bool = False):
    feeds = _feeds(np.random.default_rng(0), cache)
    return _export(_llama(cache, interleave), tuple(torch.from_numpy(v) for v in feeds.values()), *_names(cache),
                   tmp_path / "llama.onnx", exporter)


def _projections(graph, group) -> list[str]:
    """The outputs of the group's weighted producers (q, k, v; or gate, up), in graph order, found by
    the relations (the exporters name nodes differently)."""
    producers = set(group.producers)
    return [r.geometry.output for name in graph.order if name in producers
            and (r := graph.relations.get(name)) is not None and r.geometry is not None and r.geometry.weight is not None]


def _attention_and_mlp(analysis):
    prunable = [g for g in analysis.groups if g.prunable]
    return [g for g in prunable if g.size == KV], [g for g in prunable if g.size == I]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch_run(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _close(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and np.abs(e).max() > 0
        assert np.abs(e - a).max() / np.abs(e).max() < REL_TOL


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("repeat", ["expand", "interleave"])
def test_llama_prunes_kv_head_groups_and_swiglu_units(exporter, repeat, tmp_path):
    """Each layer: one group of KV = 2 attention units (a KV head with the H/KV query heads it serves)
    and one of I = 48 SwiGLU units (gate and up rows together); the hidden size is pinned by RMSNorm's
    ReduceMean. Pruning a KV group and a third of the units equals the zeroed torch module."""
    path = _llama_path(tmp_path, exporter, interleave=repeat == "interleave")
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    attention, mlp = _attention_and_mlp(analysis)
    layers = LLAMA["layers"]
    assert len(attention) == len(mlp) == layers
    assert sorted(g.size for g in analysis.groups if g.prunable) == [KV] * layers + [I] * layers
    hidden = next(g for g in analysis.groups if g.size == LLAMA["hidden"])
    assert not hidden.prunable and any(r.startswith("ReduceMean node") and "reduces over the channel axis" in r
                                       for r in hidden.pin_reasons)
    assert all(g.prunable or g.pin_reasons for g in analysis.groups)

    rng = np.random.default_rng(3)
    alive = np.ones(graph.num_classes, dtype=bool)
    dead_kv, dead_units = {}, {}
    for i, (group, units) in enumerate(zip(attention, mlp)):
        q, k, v = _projections(graph, group)
        heads = graph.classes(q).reshape(H, D)
        assert all(np.unique(heads[h]).size == 1 for h in range(H))  # a query head is one unit ...
        assert [heads[h, 0] for h in range(H)] == [graph.classes(k)[(h // SERVED) * D] for h in range(H)]  # ... of its KV head
        assert np.array_equal(graph.classes(k), graph.classes(v))
        dead_kv[i] = int(rng.integers(KV))
        alive[graph.classes(k)[dead_kv[i] * D]] = False
        gate, up = _projections(graph, units)
        assert np.array_equal(graph.classes(gate), graph.classes(up))  # the SwiGLU pair is one channel
        dead_units[i] = sorted(rng.choice(I, size=I // 3, replace=False).tolist())
        alive[graph.classes(gate)[dead_units[i]]] = False

    result = prune(path, Mask(mask_document(graph, alive)))
    assert result.removed_channels == layers * (1 + I // 3)
    assert result.masked_deviation.max_rel < REL_TOL
    onnx.checker.check_model(result.model, full_check=True)
    after = onnx_morph.analyze(result.model)
    assert after.total.flops == totals_of(op_costs(graph, alive)).flops < analysis.total.flops
    weights = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    kept_q = (H - SERVED) * D
    assert sum(dims in ((kept_q, LLAMA["hidden"]), (LLAMA["hidden"], kept_q)) for dims in weights.values()) == 2 * layers  # q, o

    module = _llama(interleave=repeat == "interleave")
    _zero_llama(module, dead_kv, dead_units)
    feeds = _feeds(np.random.default_rng(9), cache=False)
    _close(_torch_run(module, feeds), _run(result.model, feeds))


def _zero_llama(module: Llama, dead_kv: dict[int, int], dead_units: dict[int, list[int]]) -> None:
    with torch.no_grad():
        for i, layer in enumerate(module.layers):
            attention = layer.self_attn
            if i in dead_kv:
                g = dead_kv[i]
                rows = slice(g * SERVED * D, (g + 1) * SERVED * D)
                attention.q_proj.weight[rows], attention.q_proj.bias[rows] = 0, 0
                for projection in (attention.k_proj, attention.v_proj):
                    projection.weight[g * D:(g + 1) * D], projection.bias[g * D:(g + 1) * D] = 0, 0
            layer.mlp.gate_proj.weight[dead_units[i]] = 0


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_llama_with_kv_cache_prunes_mlp_units_and_pins_heads_to_the_cache(exporter, tmp_path):
    """past_key_values are graph inputs and outputs with KV heads: those heads are pinned, named by the
    cache input and output; the SwiGLU units prune, and the pruned model runs the cache exactly."""
    path = _llama_path(tmp_path, exporter, cache=True)
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    attention = [g for g in analysis.groups if any("past_k" in r for r in g.pin_reasons)]
    assert len(attention) == LLAMA["layers"]
    for i, group in enumerate(attention):
        assert not group.prunable and group.size == KV
        assert {f"graph input 'past_k{i}'", f"graph input 'past_v{i}'", f"graph output 'present_k{i}'",
                f"graph output 'present_v{i}'"} <= set(group.pin_reasons)
    mlp = [g for g in analysis.groups if g.prunable]
    assert [g.size for g in mlp] == [I] * LLAMA["layers"]

    alive = np.ones(graph.num_classes, dtype=bool)
    dead_units = {}
    for i, units in enumerate(mlp):
        gate, _ = _projections(graph, units)
        dead_units[i] = list(range(i, I, 3))
        alive[graph.classes(gate)[dead_units[i]]] = False
    result = prune(path, Mask(mask_document(graph, alive)))
    assert result.masked_deviation.max_rel < REL_TOL
    onnx.checker.check_model(result.model, full_check=True)
    module = _llama(cache=True)
    _zero_llama(module, {}, dead_units)
    feeds = _feeds(np.random.default_rng(4), cache=True)
    _close(_torch_run(module, feeds), _run(result.model, feeds))  # logits and every present key/value


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gpt2_heads_prune_through_the_fused_c_attn_split(exporter, tmp_path):
    """GPT-2: c_attn (Conv1D, E -> 3E) split into q, k, v: one group of 4 heads per layer (q, k, v rows of
    head h in each third), the 4E GELU MLP units; the LayerNorm stream is pinned."""
    e, heads = GPT2["hidden"], GPT2["heads"]
    head_dim = e // heads
    tokens = np.random.default_rng(0).integers(0, GPT2["vocab"], (1, TOKENS)).astype(np.int64)
    path = _export(_gpt2(), (torch.from_numpy(tokens),), ["input_ids"], ["logits"], tmp_path / "gpt2.onnx", exporter)
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    layers = GPT2["layers"]
    assert sorted(g.size for g in analysis.groups if g.prunable) == [heads] * layers + [4 * e] * layers
    stream = next(g for g in analysis.groups if g.size == e)
    assert any(r.startswith("LayerNormalization node") for r in stream.pin_reasons)

    alive = np.ones(graph.num_classes, dtype=bool)
    dead = {}
    for i, group in enumerate(g for g in analysis.groups if g.prunable and g.size == heads):
        (c_attn,) = [t for t in _projections(graph, group) if graph.tensors[t].shape[-1] == 3 * e]
        classes = graph.classes(c_attn).reshape(3, heads, head_dim)
        assert all(np.unique(classes[:, h]).size == 1 for h in range(heads))
        dead[i] = [i, heads - 1]
        alive[classes[0, dead[i], 0]] = False
    result = prune(path, Mask(mask_document(graph, alive)))
    assert result.removed_channels == 2 * layers
    assert result.masked_deviation.max_rel < REL_TOL
    onnx.checker.check_model(result.model, full_check=True)

    module = _gpt2()
    with torch.no_grad():
        for i, block in enumerate(module.h):
            columns = [part * e + h * head_dim + d for part in range(3) for h in dead[i] for d in range(head_dim)]
            block.c_attn.weight[:, columns], block.c_attn.bias[columns] = 0, 0
    feeds = {"input_ids": np.random.default_rng(2).integers(0, GPT2["vocab"], (1, TOKENS)).astype(np.int64)}
    _close(_torch_run(module, feeds), _run(result.model, feeds))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_multi_query_attention_prunes_value_dims_and_pins_queries_and_keys(exporter, tmp_path):
    """One KV head: k and v have no head axis. q and k stay pinned, with reasons; v's D head dims are
    channels (v_proj row d and o_proj column h*D + d of every query head h), pruned exactly."""
    config = {**LLAMA, "kv_heads": 1}
    tokens = _feeds(np.random.default_rng(0), cache=False)["input_ids"]
    torch.manual_seed(0)
    path = _export(Llama(config), (torch.from_numpy(tokens),), ["input_ids"], ["logits"], tmp_path / "mqa.onnx", exporter)
    analysis = onnx_morph.analyze(path)
    graph = analysis.graph
    layers = LLAMA["layers"]
    assert sorted(g.size for g in analysis.groups if g.prunable) == [D] * layers + [I] * layers
    pinned = [g for g in analysis.groups if not any(r.startswith(("graph", "ReduceMean")) for r in g.pin_reasons)
              and not g.prunable]  # q and k of each layer
    assert len(pinned) == 2 * layers
    assert all(any(r.startswith(("MatMul node", "Mul node")) for r in g.pin_reasons) for g in pinned)

    alive = np.ones(graph.num_classes, dtype=bool)
    values = [g for g in analysis.groups if g.prunable and g.size == D]
    for group in values:
        (v,) = _projections(graph, group)
        alive[graph.classes(v)[[1, 6]]] = False
    result = prune(path, Mask(mask_document(graph, alive)))
    assert result.removed_channels == 2 * layers
    assert result.masked_deviation.max_rel < REL_TOL
    torch.manual_seed(0)
    module = Llama(config)
    with torch.no_grad():
        for layer in module.layers:
            layer.self_attn.v_proj.weight[[1, 6]], layer.self_attn.v_proj.bias[[1, 6]] = 0, 0
    feeds = _feeds(np.random.default_rng(5), cache=False)
    _close(_torch_run(module, feeds), _run(result.model, feeds))


def _export_dynamic(module: torch.nn.Module, tokens: np.ndarray, path, exporter: str):
    """Batch and sequence length dynamic, as LLMs are exported."""
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs the onnxscript package")
            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=16)}
            torch.onnx.export(module, (torch.from_numpy(tokens),), str(path), dynamo=True, optimize=False,
                              input_names=["input_ids"], output_names=["logits"], dynamic_shapes=(dims,))
        else:
            axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
            torch.onnx.export(module, (torch.from_numpy(tokens),), str(path), dynamo=False, do_constant_folding=False,
                              opset_version=17, input_names=["input_ids"], output_names=["logits"], dynamic_axes=axes)
    return path


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruned_decoders_keep_a_dynamic_batch_and_sequence_length(family, exporter, tmp_path):
    """Analyzed and pruned at (1, 6) tokens, the pruned model runs at other batch sizes and sequence lengths:
    the targets the export computes from x.size() (head split and merge views, repeat_kv's Expand and
    Reshape, GPT-2's Conv1D view of [B*T, 3E] back to [B, T, 3E]) keep following the input, and the
    model matches the zeroed torch module there."""
    tokens = np.random.default_rng(0).integers(0, 50, (1, TOKENS)).astype(np.int64)
    build = _llama if family == "llama" else _gpt2
    path = _export_dynamic(build(), tokens, tmp_path / f"{family}.onnx", exporter)
    shapes = {"input_ids": (1, TOKENS)}
    graph = onnx_morph.analyze(path, input_shapes=shapes).graph
    alive = np.ones(graph.num_classes, dtype=bool)
    heads = [g for g in graph.groups if g.prunable and g.size == (KV if family == "llama" else GPT2["heads"])]
    assert len(heads) == 2
    for group in graph.groups:
        if group.prunable:
            alive[group.classes[:: 3 if group in heads else 4]] = False
    result = prune(path, Mask(mask_document(graph, alive)), input_shapes=shapes)
    assert result.masked_deviation.max_rel < REL_TOL

    module = build()
    _zero_by_masks(module, graph, alive, columns=family == "gpt2")
    for shape in [(1, TOKENS), (3, 9), (2, 1)]:
        feeds = {"input_ids": np.random.default_rng(sum(shape)).integers(0, 50, shape).astype(np.int64)}
        _close(_torch_run(module, feeds), _run(result.model, feeds))


def _zero_by_masks(module: torch.nn.Module, graph, alive: np.ndarray, columns: bool = False) -> None:
    """Zero in torch what the masks remove: the dead outputs' rows (Linear; columns of GPT-2's Conv1D,
    stored [in, out]) and bias entries."""
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, parameter in parameters.items():
            prefix = name[: -len("weight")]
            if name.endswith("weight") and parameter.ndim == 2:
                for dead in _dead_features(graph, alive, name, parameter.shape[1 if columns else 0]):
                    if columns:
                        parameter[:, dead] = 0
                    else:
                        parameter[dead] = 0
                    if prefix + "bias" in parameters:
                        parameters[prefix + "bias"][dead] = 0


def _dead_features(graph, alive, weight: str, width: int) -> list[np.ndarray]:
    """The dead output features of each product reading initializer `weight` (directly, or through a
    Transpose) with `width` outputs."""
    readers = {n for n, node in graph.nodes.items() if weight in node.input}
    outputs = {o for r in readers for o in graph.nodes[r].output}
    readers |= {n for n, node in graph.nodes.items() if any(i in outputs for i in node.input)}
    found = []
    for name in readers:
        relation = graph.relations.get(name)
        if relation is not None and relation.geometry is not None and relation.geometry.weight is not None:
            out = relation.geometry.output
            if graph.tensors[out].shape[-1] == width:
                found.append(np.flatnonzero(~alive[graph.classes(out)]))
    return found
