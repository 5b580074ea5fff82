"""A corpus of hostile models through both commands of the real CLI: each is refused with one line
`onnx-morph: error: ...` naming the cause and exit code 2 (never a traceback), writes no output,
leaves its files as they were, and finishes within a time limit and a 2.5 GB address-space limit
(so a tool that tried to allocate a declared terabyte would die with a traceback, failing the test).
A few inputs are valid and must be handled rather than refused: those say what `analyze` prints.

tests/test_load_errors.py's CASES (missing, empty, random bytes, truncated, checker rejects, opsets,
external data missing/short/outside, ...) already go through `analyze` in tests/test_cli.py; here
they go through `prune` as well. Every file is generated under tmp_path; nothing binary is committed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

try:
    from test_load_errors import CASES, build_cases
except ImportError:  # tests/ turned into a package
    from tests.test_load_errors import CASES, build_cases

from cli_checks import assert_user_error

MEMORY_LIMIT = 2_500_000_000  # bytes of address space for every CLI run
TIME_LIMIT = 60  # seconds per CLI run
_LIMITED_CLI = (
    "import resource, runpy, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "sys.argv = ['onnx-morph', *sys.argv[2:]]\n"
    "runpy.run_module('onnx_morph.cli', run_name='__main__', alter_sys=True)\n"
)


def run_limited(*args) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI under the memory limit; returns the process and its wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LIMITED_CLI, str(MEMORY_LIMIT), *map(str, args)],
                          capture_output=True, text=True, timeout=TIME_LIMIT, check=False)
    return proc, time.perf_counter() - start


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (symlinks as their target), to prove nothing changed.
    The sparse giants (over 64 MiB) are hashed by their first and last MiB plus size and mtime:
    reading 128 GB of holes would take minutes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "->" + os.readlink(p)
        elif p.is_file():
            h = hashlib.sha256()
            stat = p.stat()
            with open(p, "rb") as f:
                if stat.st_size > 1 << 26:
                    h.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
                    h.update(f.read(1 << 20))
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
                else:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            out[str(p.relative_to(folder))] = h.hexdigest()
    return out


# --------------------------------------------------------------------------- #
# Building hostile models with onnx.helper
# --------------------------------------------------------------------------- #


def _rng_array(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def small_cnn(dims=(1, 3, 16, 16), w1_in: int = 3, group: int = 1, bias: int | None = None, bn: int = 8) -> onnx.ModelProto:
    """x -> Conv c1 (8 channels) -> BatchNormalization -> Relu -> Conv c2 (4 channels) -> y.
    The 8 channels between the convs are a prunable group: prune has work to do."""
    inits = {"w1": _rng_array(8, w1_in, 3, 3), "s": _rng_array(bn) + 2, "b": _rng_array(bn, seed=1),
             "m": _rng_array(bn, seed=2), "v": np.abs(_rng_array(bn, seed=3)) + 1, "w2": _rng_array(4, 8, 1, 1)}
    conv_inputs = ["x", "w1"]
    if bias is not None:
        inits["b1"] = _rng_array(bias, seed=4)
        conv_inputs.append("b1")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["a"], name="c1", pads=[1, 1, 1, 1], group=group),
        helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["n"], name="bn1"),
        helper.make_node("Relu", ["n"], ["r"], name="r1"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
    ]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def small_mlp(features: int = 768, weight=(8, 768), bias: int = 8) -> onnx.ModelProto:
    """x [1,3,16,16] -> Flatten -> Gemm g1 (transB) -> Relu -> Gemm g2 -> y."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w", "b"], ["h"], name="g1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="g2", transB=1),
    ]
    side = round((features / 3) ** 0.5)
    graph = helper.make_graph(nodes, "small_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C"])],
                              [numpy_helper.from_array(_rng_array(*weight), "w"), numpy_helper.from_array(_rng_array(bias), "b"),
                               numpy_helper.from_array(_rng_array(4, 8), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())  # raw bytes: onnx.save would refuse some of these
    return path


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _initializer(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    """`model` saved in `folder` with every initializer in `location`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _edit_external(path: Path, tensor: str, **entries: str) -> None:
    """Set external-data entries (location, offset, length) of one initializer, bytes untouched."""
    model = onnx.load(str(path), load_external_data=False)
    for entry in _initializer(model, tensor).external_data:
        if entry.key in entries:
            entry.value = entries.pop(entry.key)
    for key, value in entries.items():
        new = _initializer(model, tensor).external_data.add()
        new.key, new.value = key, value
    path.write_bytes(model.SerializeToString())


@dataclass
class Hostile:
    path: Path
    fragments: list[str]  # each must appear in the error line (of both commands)
    args: list[str] = field(default_factory=list)  # extra options for both commands
    analyze_ok: list[str] | None = None  # a valid model: analyze succeeds and prints these
    prune_fragments: list[str] | None = None  # prune's error, when it differs (or analyze succeeds)


def cycle(d: Path) -> Hostile:
    model = small_cnn()
    _node(model, "r1").input[0] = "y"  # r1 reads c2's output, c2 reads r1's: a loop
    return Hostile(_save(model, d / "cycle.onnx"), ["checker", "topologically sorted", "r1"])


def self_loop(d: Path) -> Hostile:
    model = small_cnn()
    relu = _node(model, "r1")
    relu.input[0] = "r"  # reads its own output
    _node(model, "c2").input[0] = "r"
    return Hostile(_save(model, d / "self_loop.onnx"), ["checker", "topologically sorted"])


def dangling_input(d: Path) -> Hostile:
    model = small_cnn()
    model.graph.node.insert(3, helper.make_node("Add", ["r", "ghost"], ["r2"], name="add_ghost"))
    _node(model, "c2").input[0] = "r2"
    return Hostile(_save(model, d / "dangling.onnx"), ["checker", "'ghost'", "add_ghost"])


def duplicate_output(d: Path) -> Hostile:
    model = small_cnn()
    model.graph.node.insert(2, helper.make_node("Relu", ["a"], ["n"], name="second_writer"))
    return Hostile(_save(model, d / "dup_output.onnx"), ["checker", "SSA", "'n'"])


def duplicate_initializer(d: Path) -> Hostile:
    model = small_cnn()
    model.graph.initializer.append(_initializer(model, "w2"))
    return Hostile(_save(model, d / "dup_init.onnx"), ["checker", "w2", "not unique"])


def duplicate_input(d: Path) -> Hostile:
    model = small_cnn()
    model.graph.input.append(model.graph.input[0])
    return Hostile(_save(model, d / "dup_input.onnx"), ["checker", "SSA", "'x'"])


def duplicate_node_names(d: Path) -> Hostile:
    """Valid ONNX (names are for diagnostics), analyzed as c1 and c1#1; onnxruntime refuses it."""
    model = small_cnn()
    _node(model, "c2").name = "c1"
    return Hostile(_save(model, d / "dup_names.onnx"), [], analyze_ok=["c1#1"],
                   prune_fragments=["onnxruntime", "cannot run the model", "same node name (c1)"])


def conv_weight_channels(d: Path) -> Hostile:
    return Hostile(_save(small_cnn(w1_in=4), d / "conv_channels.onnx"),
                   ["Conv node 'c1'", "[8, 4, 3, 3]", "3 input and 8 output channels"])


def conv_group_zero(d: Path) -> Hostile:
    return Hostile(_save(small_cnn(group=0), d / "group0.onnx"), ["Conv node 'c1'", "group 0"])


def conv_group_not_dividing(d: Path) -> Hostile:
    return Hostile(_save(small_cnn(w1_in=1, group=2), d / "group2.onnx"),
                   ["Conv node 'c1'", "group 2", "does not divide", "3 input"])


def conv_bias_length(d: Path) -> Hostile:
    return Hostile(_save(small_cnn(bias=9), d / "conv_bias.onnx"), ["Conv node 'c1'", "bias of shape [9]", "8 output"])


def batchnorm_length(d: Path) -> Hostile:
    return Hostile(_save(small_cnn(bn=9), d / "bn_length.onnx"), ["shape inference failed", "bn1", "9", "8"])


def gemm_weight_features(d: Path) -> Hostile:
    return Hostile(_save(small_mlp(weight=(8, 700)), d / "gemm_k.onnx"), ["Gemm node 'g1'", "768 input features", "[8, 700]"])


def gemm_bias(d: Path) -> Hostile:
    return Hostile(_save(small_mlp(bias=9), d / "gemm_bias.onnx"), ["Gemm node 'g1'", "bias of shape [9]", "[1, 8]"])


def value_info_contradicts(d: Path) -> Hostile:
    model = small_cnn()
    model.graph.value_info.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 9, 16, 16]))
    return Hostile(_save(model, d / "value_info.onnx"), ["shape inference failed", "c1", "(8) vs (9)"])


def typed_data_short(d: Path) -> Hostile:
    model = small_cnn()
    tensor = _initializer(model, "w2")
    values = numpy_helper.to_array(tensor).reshape(-1)[:-3]
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.tolist())
    return Hostile(_save(model, d / "typed_short.onnx"), ["initializer 'w2'", "[4, 8, 1, 1]", "32 elements", "stores 29"])


def huge_dims_1e12(d: Path) -> Hostile:
    return Hostile(_save(small_cnn(dims=(1, 3, 10**12, 10**12)), d / "huge12.onnx"),
                   ["tensor 'x'", "1000000000000", "more than any machine holds"])


def huge_dims_1e6(d: Path) -> Hostile:
    return Hostile(_save(small_cnn(dims=(1, 3, 10**6, 10**6)), d / "huge6.onnx"),
                   ["tensor 'x'", "[1, 3, 1000000, 1000000]", "3e+12 elements"])


def huge_input_shape_option(d: Path) -> Hostile:
    model = small_cnn(dims=("N", 3, "H", "W"))
    return Hostile(_save(model, d / "dynamic.onnx"), ["tensor 'x'", "more than any machine holds"],
                   args=["--input-shape", f"x=1,3,{10**12},{10**12}"])


def huge_initializer_dims(d: Path) -> Hostile:
    model = small_cnn()
    tensor = _initializer(model, "w1")
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend([10**12, 3, 3, 3])
    return Hostile(_save(model, d / "huge_init.onnx"), ["initializer 'w1'", "impossible shape", "1000000000000"])


def huge_channels(d: Path) -> Hostile:
    """2^25 channels: within any element limit, but beyond what the channel graph may hold."""
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"], name="pool")], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**25, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2**25, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return Hostile(_save(model, d / "wide.onnx"), ["tensor 'x'", "33554432 channels", "channel graph"])


def ml_opset_too_new(d: Path) -> Hostile:
    model = small_cnn()
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 99))
    return Hostile(_save(model, d / "ml99.onnx"), ["opset 99", "'ai.onnx.ml'", "newer"])


def ir_version_too_new(d: Path) -> Hostile:
    model = small_cnn()
    model.ir_version = 99
    return Hostile(_save(model, d / "ir99.onnx"), ["checker", "ir_version 99"])


def unknown_domain_not_imported(d: Path) -> Hostile:
    model = small_cnn()
    relu = _node(model, "r1")
    relu.op_type, relu.domain = "Frobnicate", "com.acme"
    return Hostile(_save(model, d / "acme_missing.onnx"), ["checker", "'com.acme'", "Frobnicate"])


def unknown_domain_op(d: Path) -> Hostile:
    """Valid: analyze pins what the op touches; prune needs onnxruntime, which lacks the op."""
    model = small_cnn()
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], name="frob", domain="com.acme"))
    model.graph.output[0].name = "z"
    return Hostile(_save(model, d / "acme.onnx"), [], analyze_ok=["com.acme.Frobnicate", "pinned: unknown op com.acme.Frobnicate"],
                   prune_fragments=["onnxruntime", "cannot run the model", "com.acme:Frobnicate"])


def external_nested_traversal(d: Path) -> Hostile:
    path = _external(small_cnn(), d / "inner")
    (d / "inner" / "sub").mkdir()
    (d / "inner" / "weights.bin").rename(d / "outside.bin")
    for name in ("w1", "s", "b", "m", "v", "w2"):
        _edit_external(path, name, location="sub/../../outside.bin")
    return Hostile(path, ["sub/../../outside.bin", "outside the model's folder", "refused"])


def external_symlink_out(d: Path) -> Hostile:
    path = _external(small_cnn(), d / "inner")
    (d / "inner" / "weights.bin").rename(d / "outside.bin")
    (d / "inner" / "weights.bin").symlink_to(d / "outside.bin")
    return Hostile(path, ["'weights.bin'", "outside the model's folder", "refused"])


def external_nul_location(d: Path) -> Hostile:
    path = _external(small_cnn(), d / "m")
    _edit_external(path, "w1", location="weights\x00.bin")
    return Hostile(path, ["initializer 'w1'", "invalid external data location"])


def external_offset_malformed(d: Path) -> Hostile:
    path = _external(small_cnn(), d / "m")
    _edit_external(path, "w2", offset="twelve")
    return Hostile(path, ["initializer 'w2'", "malformed external data offset"])


def external_offset_negative(d: Path) -> Hostile:
    path = _external(small_cnn(), d / "m")
    _edit_external(path, "w2", offset="-64")
    return Hostile(path, ["initializer 'w2'", "malformed external data offset"])


def external_length_contradicts(d: Path) -> Hostile:
    path = _external(small_cnn(), d / "m")
    _edit_external(path, "w2", length="64")
    return Hostile(path, ["initializer 'w2'", "[4, 8, 1, 1] (128 bytes)", "stores 64 bytes"])


def external_declared_huge(d: Path) -> Hostile:
    """An initializer declaring 256 GB in an external file of a few hundred bytes (no length entry)."""
    model = small_cnn()
    model.graph.initializer.append(TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[2**36]))
    path = _external(model, d / "m")
    loaded = onnx.load(str(path), load_external_data=False)
    tensor = _initializer(loaded, "big")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    path.write_bytes(loaded.SerializeToString())
    return Hostile(path, ["'weights.bin'", "shorter than initializer 'big' needs"])


def over_2gb_file(d: Path) -> Hostile:
    """A model file of 2 GB + 1 byte, sparse (nothing is written past the model's own bytes)."""
    path = _save(small_cnn(), d / "big.onnx")
    with open(path, "r+b") as f:
        f.truncate(2**31)
    return Hostile(path, ["2147483648 bytes", "2 GB limit", "external data"])


def weights_beyond_memory(d: Path) -> Hostile:
    """A valid model whose MatMul weight is 128 GB in a sparse external file: analyze reads no
    weight and succeeds; prune must read it and refuses before allocating."""
    k, n = 2**15, 2**20
    d.mkdir(parents=True, exist_ok=True)
    weights = d / "weights.bin"
    w_bytes, w2_bytes = k * n * 4, n * 4 * 4
    with open(weights, "wb") as f:
        f.truncate(w_bytes + w2_bytes)
    inits = []
    for name, dims, offset, length in (("w", [k, n], 0, w_bytes), ("w2", [n, 4], w_bytes, w2_bytes)):
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "huge_weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), d / "model.onnx")
    return Hostile(path, [], analyze_ok=["prunable", "mm1"],
                   prune_fragments=["the values of initializer 'w'", "137 GB of memory", "more than this process may use"])


def activations_beyond_memory(d: Path) -> Hostile:
    """Valid, 2^37-element activations (512 GB): analyze counts them; prune would have to run them."""
    path = _save(small_cnn(dims=(1, 3, 2**17, 2**17)), d / "big_activations.onnx")
    return Hostile(path, [], analyze_ok=["prunable", "c1"],
                   prune_fragments=["onnxruntime runs on random inputs", "tensor 'a' of shape [1, 8, 131072, 131072]",
                                    "GB of memory"])


HOSTILE: dict[str, Callable[[Path], Hostile]] = {
    "cycle": cycle,
    "self-loop": self_loop,
    "dangling-input": dangling_input,
    "duplicate-output": duplicate_output,
    "duplicate-initializer": duplicate_initializer,
    "duplicate-input": duplicate_input,
    "duplicate-node-names": duplicate_node_names,
    "conv-weight-channels": conv_weight_channels,
    "conv-group-zero": conv_group_zero,
    "conv-group-not-dividing": conv_group_not_dividing,
    "conv-bias-length": conv_bias_length,
    "batchnorm-length": batchnorm_length,
    "gemm-weight-features": gemm_weight_features,
    "gemm-bias": gemm_bias,
    "value-info-contradicts": value_info_contradicts,
    "typed-data-short": typed_data_short,
    "huge-dims-1e12": huge_dims_1e12,
    "huge-dims-1e6": huge_dims_1e6,
    "huge-input-shape-option": huge_input_shape_option,
    "huge-initializer-dims": huge_initializer_dims,
    "huge-channels": huge_channels,
    "ml-opset-too-new": ml_opset_too_new,
    "ir-version-too-new": ir_version_too_new,
    "unknown-domain-not-imported": unknown_domain_not_imported,
    "unknown-domain-op": unknown_domain_op,
    "external-nested-traversal": external_nested_traversal,
    "external-symlink-out": external_symlink_out,
    "external-nul-location": external_nul_location,
    "external-offset-malformed": external_offset_malformed,
    "external-offset-negative": external_offset_negative,
    "external-length-contradicts": external_length_contradicts,
    "external-declared-huge": external_declared_huge,
    "over-2gb-file": over_2gb_file,
    "weights-beyond-memory": weights_beyond_memory,
    "activations-beyond-memory": activations_beyond_memory,
}


# --------------------------------------------------------------------------- #
# Running every case through both commands (in parallel, once per module)
# --------------------------------------------------------------------------- #


@dataclass
class Outcome:
    case: Hostile
    analyze: subprocess.CompletedProcess
    prune: subprocess.CompletedProcess
    seconds: float
    before: dict[str, str]
    after: dict[str, str]
    outputs: list[str]


def _run_case(case: Hostile, folder: Path, out: Path) -> Outcome:
    before = digest(folder)
    analyze, t1 = run_limited("analyze", case.path, *case.args)
    prune, t2 = run_limited("prune", case.path, "-o", out / "pruned.onnx", "--ratio", "0.5", *case.args)
    return Outcome(case, analyze, prune, max(t1, t2), before, digest(folder), sorted(os.listdir(out)))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("hostile")
    jobs = {}
    for name, build in HOSTILE.items():
        folder, out = root / name / "in", root / name / "out"
        folder.mkdir(parents=True)
        out.mkdir()
        jobs[name] = (build(folder), folder, out)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_case, *job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_model(name, outcomes):
    outcome = outcomes[name]
    case = outcome.case
    if case.analyze_ok is None:
        assert_user_error(outcome.analyze, str(case.path), *case.fragments)
    else:
        assert outcome.analyze.returncode == 0, outcome.analyze.stderr
        assert outcome.analyze.stderr == ""
        for fragment in case.analyze_ok:
            assert fragment in outcome.analyze.stdout, (fragment, outcome.analyze.stdout)
    prune_fragments = case.prune_fragments if case.prune_fragments is not None else case.fragments
    assert_user_error(outcome.prune, str(case.path), *prune_fragments)
    assert outcome.outputs == [], "prune left files in the output folder"
    assert outcome.after == outcome.before, "the input files changed"
    assert outcome.seconds < TIME_LIMIT / 2


def test_the_corpus_is_refused_for_the_stated_reasons(outcomes):
    """Every refusal names a distinct cause: no two cases collapse into one generic message."""
    lines = [o.prune.stderr.strip() for o in outcomes.values()]
    causes = {line.split(": ", 3)[-1] for line in lines}
    assert len(causes) >= len(HOSTILE) - 3, sorted(causes)


# --------------------------------------------------------------------------- #
# test_load_errors.CASES through `prune` (test_cli.py runs them through `analyze`)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def load_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_cases")
    cases = build_cases(root)
    jobs = {}
    for name, case in cases.items():
        out = root / "out" / name
        out.mkdir(parents=True)
        shapes = [a for k, v in (case.input_shapes or {}).items()
                  for a in ("--input-shape", f"{k}={','.join(map(str, v))}")]
        jobs[name] = (out, ["prune", case.source, "-o", out / "pruned.onnx", "--ratio", "0.5", *shapes])
    before = digest(root / "cases")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_limited, *args) for name, (_, args) in jobs.items()}
        procs = {name: future.result()[0] for name, future in futures.items()}
    return cases, procs, {name: sorted(os.listdir(out)) for name, (out, _) in jobs.items()}, before, digest(root / "cases")


@pytest.mark.parametrize("name", list(CASES))
def test_load_error_through_prune(name, load_cases):
    cases, procs, outputs, *_ = load_cases
    assert_user_error(procs[name], *cases[name].fragments)
    assert outputs[name] == []


def test_load_errors_leave_their_files_alone(load_cases):
    *_, before, after = load_cases
    assert after == before


# --------------------------------------------------------------------------- #
# A model over 2 GB for real (slow: it writes about 4.5 GB)
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_a_model_over_2gb_prunes_to_external_data(tmp_path):
    """protobuf cannot serialize (nor, under upb, even size) a message over 2 GB: the input is read
    with its weights outside, the result is written with its weights in `<name>.data`."""
    from onnx_morph.rewrite import Budget, prune_file

    k, n = 2**15, 17000  # a 2.2 GB weight: even building it in memory fails, so it goes to a file directly
    source = tmp_path / "in" / "big.onnx"
    source.parent.mkdir()
    rng = np.random.default_rng(0)
    with open(source.parent / "big.onnx.data", "wb") as f:
        for _ in range(k // 1024):
            rng.standard_normal((1024, n), dtype=np.float32).tofile(f)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[k, n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(k * n * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [w, numpy_helper.from_array(_rng_array(n, 4), "w2")])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    result = prune_file(source, out, Budget(ratio=0.99))
    assert 0 < result.removed_channels and (n - result.removed_channels) * k * 4 > 2**31  # still over 2 GB
    assert any("over 2 GB" in note for note in result.notes)
    assert sorted(os.listdir(out.parent)) == ["small.onnx", "small.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    dims = {t.name: list(t.dims) for t in written.graph.initializer}
    weights = {node.name: node.input[1] for node in written.graph.node if node.op_type == "MatMul"}
    kept = n - result.removed_channels
    assert dims[weights["mm1"]] == [k, kept] and dims[weights["mm2"]] == [kept, 4]
    assert (out.parent / "small.onnx.data").stat().st_size >= k * kept * 4
