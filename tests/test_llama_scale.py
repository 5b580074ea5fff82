"""tools/bench_llama_scale.py's Llama-shaped generator at 2 layers and small sizes: analyze counts every weight
(external data it never reads) and finds one prunable group per SwiGLU MLP and per attention's heads."""

from __future__ import annotations

import onnx_morph
from tools.bench_llama_scale import build_llama

LAYERS, HIDDEN, INTERMEDIATE, HEADS, VOCAB, TOKENS = 2, 64, 176, 4, 100, 8


def test_two_layer_llama_groups_and_params(tmp_path):
    path = tmp_path / "llama.onnx"
    weights = build_llama(path, LAYERS, HIDDEN, INTERMEDIATE, HEADS, VOCAB, TOKENS)
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    assert weights == LAYERS * per_layer + 2 * VOCAB * HIDDEN + HIDDEN
    (tmp_path / "llama.onnx.data").chmod(0)  # analyze must not read the weights

    analysis = onnx_morph.analyze(str(path))

    # Every weight once; the small constants once per op using them (mask and scale per attention, 2 and eps per norm).
    norms = 2 * LAYERS + 1
    assert analysis.total.params == weights + LAYERS * (TOKENS * TOKENS + 1) + 2 * norms
    prunable = sorted((g.size, tuple(p for p in g.producers if p.endswith("_proj"))) for g in analysis.groups
                      if g.prunable)
    assert prunable == sorted(
        [(HEADS, tuple(f"layers.{i}/self_attn/{p}_proj" for p in "qkv")) for i in range(LAYERS)]
        + [(INTERMEDIATE, (f"layers.{i}/mlp/gate_proj", f"layers.{i}/mlp/up_proj")) for i in range(LAYERS)])
    hidden = next(g for g in analysis.groups if g.size == HIDDEN and not g.prunable)
    assert any("ReduceMean" in reason for reason in hidden.pin_reasons)
    assert len(analysis.groups) == 2 * LAYERS + 3  # plus the hidden stream, the token input and the logits
