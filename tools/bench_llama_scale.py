#!/usr/bin/env python
"""Time `onnx-morph analyze` on a Llama-7B-shaped graph whose weights are never read.

    python -m tools.bench_llama_scale [--workdir DIR] [--layers 32] [--hidden 4096]
                                      [--intermediate 11008] [--heads 32] [--vocab 32000]
                                      [--tokens 16] [--prune]

Builds the graph with onnx.helper: token embedding (Gather), per layer RMSNorm written as
Pow/ReduceMean/Add/Sqrt/Div/Mul, attention with q/k/v MatMuls split into heads by
Reshape/Transpose, causal mask, softmax, output projection and residual; RMSNorm; SwiGLU MLP
(SiLU(x W_gate) * (x W_up)) W_down and residual; final RMSNorm and an untied LM head. Every
weight is float32 external data at its own offset of one sparse file made with truncate(), so
the 27 GB of weights cost no disk. Runs `onnx-morph analyze --json` as a subprocess and prints
its wall time and peak RSS (RUSAGE_CHILDREN, the largest child so far: analyze runs first) and
PASS/FAIL against the targets (< 10 s, < 1 GB). With --prune, also runs `onnx-morph prune
--no-verify` with a mask removing a few MLP units of layer 0 and prints how it ends: written
with external data, or a clean refusal when the weights do not fit in memory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

BIN = pathlib.Path(sys.executable).parent
TIME_TARGET_S = 10.0
RSS_TARGET_BYTES = 1 << 30


class _Weights:
    """Initializers pointing at consecutive offsets of one external data file."""

    def __init__(self, location: str):
        self.location = location
        self.offset = 0
        self.tensors: list[TensorProto] = []

    def add(self, name: str, shape: tuple[int, ...]) -> str:
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
        length = 4 * int(np.prod(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        self.offset += length
        self.tensors.append(tensor)
        return name


def _rms_norm(nodes: list, weights: _Weights, x: str, prefix: str, hidden: int) -> str:
    names = [f"{prefix}/{n}" for n in ("sq", "mean", "eps_add", "rms", "normed", "out")]
    nodes += [
        helper.make_node("Pow", [x, "two"], [names[0]], name=names[0]),
        helper.make_node("ReduceMean", [names[0]], [names[1]], name=names[1], axes=[-1], keepdims=1),
        helper.make_node("Add", [names[1], "eps"], [names[2]], name=names[2]),
        helper.make_node("Sqrt", [names[2]], [names[3]], name=names[3]),
        helper.make_node("Div", [x, names[3]], [names[4]], name=names[4]),
        helper.make_node("Mul", [names[4], weights.add(f"{prefix}.weight", (hidden,))], [names[5]], name=names[5]),
    ]
    return names[5]


def _matmul(nodes: list, weights: _Weights, x: str, name: str, shape: tuple[int, int]) -> str:
    nodes.append(helper.make_node("MatMul", [x, weights.add(f"{name}.weight", shape)], [name], name=name))
    return name


def _attention(nodes: list, weights: _Weights, x: str, p: str, hidden: int) -> str:
    q, k, v = (_matmul(nodes, weights, x, f"{p}/{n}_proj", (hidden, hidden)) for n in "qkv")
    nodes += [
        helper.make_node("Reshape", [q, "heads_shape"], [f"{p}/q_heads"], name=f"{p}/q_reshape"),
        helper.make_node("Transpose", [f"{p}/q_heads"], [f"{p}/q_t"], name=f"{p}/q_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [k, "heads_shape"], [f"{p}/k_heads"], name=f"{p}/k_reshape"),
        helper.make_node("Transpose", [f"{p}/k_heads"], [f"{p}/k_t"], name=f"{p}/k_transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", [v, "heads_shape"], [f"{p}/v_heads"], name=f"{p}/v_reshape"),
        helper.make_node("Transpose", [f"{p}/v_heads"], [f"{p}/v_t"], name=f"{p}/v_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", [f"{p}/q_t", f"{p}/k_t"], [f"{p}/scores"], name=f"{p}/scores"),
        helper.make_node("Mul", [f"{p}/scores", "scale"], [f"{p}/scaled"], name=f"{p}/scale"),
        helper.make_node("Add", [f"{p}/scaled", "causal_mask"], [f"{p}/masked"], name=f"{p}/mask"),
        helper.make_node("Softmax", [f"{p}/masked"], [f"{p}/probs"], name=f"{p}/softmax", axis=-1),
        helper.make_node("MatMul", [f"{p}/probs", f"{p}/v_t"], [f"{p}/context"], name=f"{p}/context"),
        helper.make_node("Transpose", [f"{p}/context"], [f"{p}/context_t"], name=f"{p}/context_transpose",
                         perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{p}/context_t", "hidden_shape"], [f"{p}/merged"], name=f"{p}/merge"),
    ]
    return _matmul(nodes, weights, f"{p}/merged", f"{p}/o_proj", (hidden, hidden))


def _mlp(nodes: list, weights: _Weights, x: str, p: str, hidden: int, intermediate: int) -> str:
    gate = _matmul(nodes, weights, x, f"{p}/gate_proj", (hidden, intermediate))
    up = _matmul(nodes, weights, x, f"{p}/up_proj", (hidden, intermediate))
    nodes += [
        helper.make_node("Sigmoid", [gate], [f"{p}/gate_sigmoid"], name=f"{p}/gate_sigmoid"),
        helper.make_node("Mul", [gate, f"{p}/gate_sigmoid"], [f"{p}/silu"], name=f"{p}/silu"),
        helper.make_node("Mul", [f"{p}/silu", up], [f"{p}/swiglu"], name=f"{p}/swiglu"),
    ]
    return _matmul(nodes, weights, f"{p}/swiglu", f"{p}/down_proj", (intermediate, hidden))


def build_llama(path: pathlib.Path, layers: int = 32, hidden: int = 4096, intermediate: int = 11008,
                heads: int = 32, vocab: int = 32000, tokens: int = 16) -> int:
    """Write the graph to `path` with its weights in a sparse `<name>.data` beside it; returns the
    weight count (every initializer listed in external data)."""
    weights = _Weights(path.name + ".data")
    nodes: list = []
    nodes.append(helper.make_node("Gather", [weights.add("embed_tokens.weight", (vocab, hidden)), "input_ids"],
                                  ["embeds"], name="embed_tokens"))
    x = "embeds"
    for layer in range(layers):
        p = f"layers.{layer}"
        attn = _attention(nodes, weights, _rms_norm(nodes, weights, x, f"{p}.input_layernorm", hidden),
                          f"{p}/self_attn", hidden)
        nodes.append(helper.make_node("Add", [x, attn], [f"{p}/attn_residual"], name=f"{p}/attn_residual"))
        x = f"{p}/attn_residual"
        mlp = _mlp(nodes, weights, _rms_norm(nodes, weights, x, f"{p}.post_attention_layernorm", hidden),
                   f"{p}/mlp", hidden, intermediate)
        nodes.append(helper.make_node("Add", [x, mlp], [f"{p}/mlp_residual"], name=f"{p}/mlp_residual"))
        x = f"{p}/mlp_residual"
    _matmul(nodes, weights, _rms_norm(nodes, weights, x, "norm", hidden), "logits", (hidden, vocab))
    head_dim = hidden // heads
    mask = np.triu(np.full((tokens, tokens), -1e4, dtype=np.float32), k=1).reshape(1, 1, tokens, tokens)
    small = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale"),
        numpy_helper.from_array(mask, "causal_mask"),
        numpy_helper.from_array(np.array([1, tokens, heads, head_dim], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([1, tokens, hidden], np.int64), "hidden_shape"),
    ]
    graph = helper.make_graph(
        nodes, "llama", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, tokens])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, tokens, vocab])],
        initializer=[*small, *weights.tensors])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    with open(path.parent / weights.location, "wb") as f:
        f.truncate(weights.offset)  # a hole: no disk blocks until written
    return weights.offset // 4


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    return proc, time.perf_counter() - start


def _prune(path: pathlib.Path, workdir: pathlib.Path, units: int) -> None:
    mask = [0, 0, 0] + [1] * (units - 3)  # the first three SwiGLU units of layer 0
    document = {"format": "onnx-morph-masks", "version": 1, "masks": {"layers.0/mlp/gate_proj": mask}}
    mask_path = workdir / "mask.json"
    mask_path.write_text(json.dumps(document))
    out = workdir / "pruned.onnx"
    proc, seconds = _run([str(BIN / "onnx-morph"), "prune", str(path), "--mask", str(mask_path),
                          "-o", str(out), "--no-verify"])
    data = sorted(p.name for p in workdir.iterdir() if p.name.startswith("pruned"))
    print(f"prune: exit {proc.returncode} in {seconds:.1f} s; files {data}")
    print("  " + (proc.stdout + proc.stderr).strip()[-800:].replace("\n", "\n  "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prune", action="store_true", help="also prune a few MLP units with --no-verify")
    args = parser.parse_args()
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="llama_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "llama.onnx"
    count = build_llama(path, args.layers, args.hidden, args.intermediate, args.heads, args.vocab, args.tokens)
    print(f"graph: {path} ({path.stat().st_size / 1e6:.1f} MB), {count / 1e9:.2f} G weights as sparse external data")
    proc, seconds = _run([str(BIN / "onnx-morph"), "analyze", str(path), "--json"])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        sys.exit(f"analyze failed: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    prunable = [g for g in report["groups"] if g["prunable"]]
    print(f"analyze: {seconds:.2f} s, peak RSS {rss / 2**20:.0f} MiB; params {report['total']['params']:,}; "
          f"{len(report['groups'])} groups, {len(prunable)} prunable ({sum(g['size'] for g in prunable)} channels)")
    print(f"{'PASS' if seconds < TIME_TARGET_S else 'FAIL'} time < {TIME_TARGET_S:.0f} s; "
          f"{'PASS' if rss < RSS_TARGET_BYTES else 'FAIL'} peak RSS < 1 GiB")
    if args.prune:
        _prune(path, workdir, args.intermediate)


if __name__ == "__main__":
    main()
