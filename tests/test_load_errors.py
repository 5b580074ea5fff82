"""load_model / parse_input_shapes on bad input: every failure is a ModelLoadError or OptionError
whose one-line message names the file and the specific cause (and the node, initializer or
input involved); plus the happy paths next to each failure (external data present, dynamic
batch default, --input-shape for a dynamic token axis, in-memory ModelProto) and a check that
loading never touches the files it reads.

The malformed-input cases live in ``CASES`` so that tests/test_cli.py can run the same inputs
through the command line.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tools import zoo

from onnx_morph.errors import ModelLoadError, OnnxMorphError, OptionError
from onnx_morph.graph.load import MAX_OPSET, MIN_OPSET, load_model, parse_input_shapes


# --------------------------------------------------------------------------- #
# Base models (exported once per test module)
# --------------------------------------------------------------------------- #


def export_token_dynamic(path: Path) -> Path:
    """TransformerBlock with a dynamic token axis (axis 1) and a fixed batch of 1."""
    factory, shape = zoo.ZOO["TransformerBlock"]
    module = factory()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(
                module, (torch.randn(*shape),), str(path), dynamo=False, do_constant_folding=False,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {1: "tokens"}, "output": {1: "tokens"}},
            )
    return path


def build_base_models(folder: Path) -> dict[str, Path]:
    """static: ConvStack (1,3,16,16); dynbatch: same with a dynamic batch; tokens: see above."""
    folder.mkdir(parents=True, exist_ok=True)
    factory, shape = zoo.ZOO["ConvStack"]
    return {
        "static": zoo.export_onnx(factory(), shape, folder / "convstack.onnx"),
        "dynbatch": zoo.export_onnx(factory(), shape, folder / "convstack_dyn.onnx", dynamic_batch=True),
        "tokens": export_token_dynamic(folder / "transformer_tokens.onnx"),
    }


def save_external(source: Path, folder: Path) -> Path:
    """Re-save `source` as folder/model.onnx with every tensor in folder/weights.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    target = folder / "model.onnx"
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").is_file()
    return target


def _set_location(model_path: Path, location: str) -> None:
    """Point every external initializer of model_path at `location` (raw rewrite, no data moved)."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def _with_opset(source: Path, target: Path, version: int) -> Path:
    model = onnx.load(str(source))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
    target.write_bytes(model.SerializeToString())
    return target


def _first_initializer(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.initializer[0].name


# --------------------------------------------------------------------------- #
# Malformed-input cases (shared with test_cli.py)
# --------------------------------------------------------------------------- #


@dataclass
class Case:
    source: Path
    error: type
    fragments: list[str]  # every one must appear in the message
    input_shapes: dict[str, tuple[int, ...]] | None = None


def _missing(d: Path, base: dict) -> Case:
    p = d / "does_not_exist.onnx"
    return Case(p, ModelLoadError, [str(p), "no such file"])


def _directory(d: Path, base: dict) -> Case:
    p = d / "a_folder.onnx"
    p.mkdir()
    return Case(p, ModelLoadError, [str(p), "not a regular file"])


def _empty(d: Path, base: dict) -> Case:
    p = d / "empty.onnx"
    p.write_bytes(b"")
    return Case(p, ModelLoadError, [str(p), "empty"])


def _random_bytes(d: Path, base: dict, seed: int = 0) -> Case:
    p = d / f"random{seed}.onnx"
    p.write_bytes(np.random.default_rng(seed).bytes(4096))
    return Case(p, ModelLoadError, [str(p), "not an ONNX model"])


def _truncated(d: Path, base: dict) -> Case:
    data = base["static"].read_bytes()
    p = d / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    return Case(p, ModelLoadError, [str(p), "not an ONNX model", "corrupt or truncated"])


def _other_message(d: Path, base: dict) -> Case:
    """A valid protobuf that is not a ModelProto (a serialized TensorProto)."""
    p = d / "tensor.onnx"
    p.write_bytes(numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t").SerializeToString())
    return Case(p, ModelLoadError, [str(p), "not an ONNX model"])


def build_checker_reject(path: Path) -> Path:
    """Relu node 'relu1' reads 'nope', which neither a node nor an input produces."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nope"], ["y"], name="relu1")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _checker(d: Path, base: dict) -> Case:
    p = build_checker_reject(d / "checker.onnx")
    return Case(p, ModelLoadError, [str(p), "checker", "'nope'"])


def _opset(version: int) -> Callable[[Path, dict], Case]:
    def build(d: Path, base: dict) -> Case:
        p = _with_opset(base["static"], d / f"opset{version}.onnx", version)
        return Case(p, ModelLoadError, [str(p), f"opset {version}", "supported", str(MIN_OPSET), str(MAX_OPSET)])

    return build


def _no_default_opset(d: Path, base: dict) -> Case:
    model = onnx.load(str(base["static"]))
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    p = d / "no_default_opset.onnx"
    p.write_bytes(model.SerializeToString())
    return Case(p, ModelLoadError, [str(p), "ai.onnx"])


def _external_missing(d: Path, base: dict) -> Case:
    p = save_external(base["static"], d / "ext_missing")
    (p.parent / "weights.bin").unlink()
    return Case(p, ModelLoadError, [str(p), "weights.bin", "missing", f"'{_first_initializer(p)}'"])


def _external_short(d: Path, base: dict) -> Case:
    p = save_external(base["static"], d / "ext_short")
    weights = p.parent / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    return Case(p, ModelLoadError, [str(p), "weights.bin", "shorter"])


def _external_outside(d: Path, base: dict) -> Case:
    p = save_external(base["static"], d / "ext_outside" / "inner")
    # the file exists at ../outside.bin, so the refusal is about the location, not a missing file
    (p.parent / "weights.bin").rename(p.parent.parent / "outside.bin")
    _set_location(p, "../outside.bin")
    return Case(p, ModelLoadError, [str(p), "../outside.bin", "outside the model's folder", "refused"])


def _external_absolute(d: Path, base: dict) -> Case:
    p = save_external(base["static"], d / "ext_absolute")
    absolute = str((p.parent / "weights.bin").resolve())
    _set_location(p, absolute)
    return Case(p, ModelLoadError, [str(p), absolute, "outside the model's folder", "refused"])


def _raw_data_mismatch(d: Path, base: dict) -> Case:
    model = onnx.load(str(base["static"]))
    tensor = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    assert list(tensor.dims) == [8, 3, 3, 3] and len(tensor.raw_data) == 864
    tensor.raw_data = tensor.raw_data[:-4]
    p = d / "raw_mismatch.onnx"
    p.write_bytes(model.SerializeToString())
    return Case(p, ModelLoadError, [str(p), "'conv1.weight'", "[8, 3, 3, 3]", "864", "860"])


def _dynamic_tokens(d: Path, base: dict) -> Case:
    p = base["tokens"]
    return Case(p, OptionError, [str(p), "'input'", "dynamic", "--input-shape input="])


def _shape_unknown_name(d: Path, base: dict) -> Case:
    p = base["static"]
    return Case(p, OptionError, [str(p), "--input-shape", "nope", "not a model input", "input"],
                input_shapes={"nope": (1, 3, 16, 16)})


def _shape_wrong_rank(d: Path, base: dict) -> Case:
    p = base["dynbatch"]
    return Case(p, OptionError, [str(p), "'input'", "rank 3", "rank 4"], input_shapes={"input": (1, 3, 16)})


def _shape_conflict(d: Path, base: dict) -> Case:
    p = base["dynbatch"]
    return Case(p, OptionError, [str(p), "'input'", "dimension 1", "4", "fixes it at 3"],
                input_shapes={"input": (1, 4, 16, 16)})


def _shape_conflict_batch(d: Path, base: dict) -> Case:
    p = base["static"]  # the static model fixes the batch at 1
    return Case(p, OptionError, [str(p), "'input'", "dimension 0", "fixes it at 1"],
                input_shapes={"input": (2, 3, 16, 16)})


def _shape_zero(d: Path, base: dict) -> Case:
    p = base["dynbatch"]
    return Case(p, OptionError, [str(p), "'input'", "dimension 0", "positive"], input_shapes={"input": (0, 3, 16, 16)})


def _shape_negative(d: Path, base: dict) -> Case:
    p = base["tokens"]
    return Case(p, OptionError, [str(p), "'input'", "dimension 1", "positive"], input_shapes={"input": (1, -6, 16)})


CASES: dict[str, Callable[[Path, dict], Case]] = {
    "missing-file": _missing,
    "directory": _directory,
    "empty-file": _empty,
    "random-bytes": _random_bytes,
    "truncated": _truncated,
    "not-a-modelproto": _other_message,
    "checker-rejects": _checker,
    "opset-9": _opset(9),
    "opset-10": _opset(10),
    "opset-22": _opset(22),
    "opset-25": _opset(25),
    "no-default-opset": _no_default_opset,
    "external-missing": _external_missing,
    "external-short": _external_short,
    "external-outside": _external_outside,
    "external-absolute": _external_absolute,
    "raw-data-mismatch": _raw_data_mismatch,
    "dynamic-token-axis": _dynamic_tokens,
    "shape-unknown-name": _shape_unknown_name,
    "shape-wrong-rank": _shape_wrong_rank,
    "shape-conflict": _shape_conflict,
    "shape-conflict-batch": _shape_conflict_batch,
    "shape-zero": _shape_zero,
    "shape-negative": _shape_negative,
}

# Malformed --input-shape specs: parse_input_shapes must reject each.
BAD_SPECS = ["x", "x=", "x=1,a", "=1,2", "x=1,,2", "x=1.5", "x=1;2"]


def build_cases(folder: Path, base: dict[str, Path] | None = None) -> dict[str, Case]:
    """Build every case of CASES under folder (exporting the base models there unless given)."""
    base = base if base is not None else build_base_models(folder / "base")
    cases = {}
    for name, build in CASES.items():
        case_dir = folder / "cases" / name
        case_dir.mkdir(parents=True)
        cases[name] = build(case_dir, base)
    return cases


def assert_message(message: str, case: Case) -> None:
    missing = [f for f in case.fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("load_errors")


@pytest.fixture(scope="module")
def base(workdir) -> dict[str, Path]:
    return build_base_models(workdir / "base")


@pytest.fixture(scope="module")
def cases(workdir, base) -> dict[str, Case]:
    return build_cases(workdir, base)


# --------------------------------------------------------------------------- #
# Error cases
# --------------------------------------------------------------------------- #


def test_error_classes_share_the_base():
    assert issubclass(ModelLoadError, OnnxMorphError)
    assert issubclass(OptionError, OnnxMorphError)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input(name, cases):
    case = cases[name]
    with pytest.raises(case.error) as info:
        load_model(case.source, case.input_shapes)
    assert type(info.value) is case.error
    assert_message(str(info.value), case)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_given_as_str(name, cases):
    """A str path behaves like a Path and is echoed verbatim in the message."""
    case = cases[name]
    with pytest.raises(case.error) as info:
        load_model(str(case.source), case.input_shapes)
    assert_message(str(info.value), case)


@pytest.mark.parametrize("seed", range(1, 8))
def test_random_bytes_other_seeds(seed, tmp_path):
    case = _random_bytes(tmp_path, {}, seed)
    with pytest.raises(ModelLoadError) as info:
        load_model(case.source)
    assert_message(str(info.value), case)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_anywhere(fraction, base, tmp_path):
    data = base["static"].read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError) as info:
        load_model(p)
    assert str(p) in str(info.value) and "not an ONNX model" in str(info.value)


def test_checker_message_names_the_node(cases):
    """The checker's message spans several lines; the node's name is on the second one and must
    survive the flattening to one line (it did not while load.py kept only the first line)."""
    with pytest.raises(ModelLoadError) as info:
        load_model(cases["checker-rejects"].source)
    message = str(info.value)
    assert "\n" not in message
    assert "relu1" in message
    assert "is not output of any previous nodes" in message


def test_external_data_in_memory_model_is_refused(base, tmp_path):
    p = save_external(base["static"], tmp_path / "ext")
    model = onnx.load(str(p), load_external_data=False)
    with pytest.raises(ModelLoadError) as info:
        load_model(model)
    message = str(info.value)
    assert "weights.bin" in message and f"'{_first_initializer(p)}'" in message and "path" in message


# --------------------------------------------------------------------------- #
# Happy paths next to the failures
# --------------------------------------------------------------------------- #


def test_external_data_present_loads(base, tmp_path):
    p = save_external(base["static"], tmp_path / "ext")
    inline = load_model(base["static"])
    loaded = load_model(p)
    assert loaded.opset == inline.opset
    assert loaded.shapes == inline.shapes
    assert loaded.input_shapes == {"input": (1, 3, 16, 16)}
    reference = onnx.load(str(base["static"]))
    for tensor in reference.graph.initializer:
        np.testing.assert_array_equal(loaded.constant(tensor.name), numpy_helper.to_array(tensor))


def test_external_data_present_loads_from_relative_path(base, tmp_path, monkeypatch):
    save_external(base["static"], tmp_path / "ext")
    monkeypatch.chdir(tmp_path)
    loaded = load_model(Path("ext") / "model.onnx")
    np.testing.assert_array_equal(
        loaded.constant("conv1.weight"),
        numpy_helper.to_array(next(t for t in onnx.load(str(base["static"])).graph.initializer
                                   if t.name == "conv1.weight")),
    )


def test_external_data_analyze_matches_inline(base, tmp_path):
    from onnx_morph import analyze

    p = save_external(base["static"], tmp_path / "ext")
    assert analyze(p).total == analyze(base["static"]).total


def test_static_model_loads_without_notes(base):
    loaded = load_model(base["static"])
    assert loaded.input_shapes == {"input": (1, 3, 16, 16)}
    assert loaded.notes == []
    assert loaded.shapes["output"] == (1, 16, 8, 8)


def test_dynamic_batch_defaults_to_one(base):
    assert onnx.load(str(base["dynbatch"])).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    loaded = load_model(base["dynbatch"])
    assert loaded.input_shapes == {"input": (1, 3, 16, 16)}
    assert loaded.shapes["output"] == (1, 16, 8, 8)
    assert len(loaded.notes) == 1
    note = loaded.notes[0]
    assert "'input'" in note and "batch" in note and "1" in note


def test_dynamic_batch_can_be_set(base):
    loaded = load_model(base["dynbatch"], {"input": (4, 3, 16, 16)})
    assert loaded.input_shapes == {"input": (4, 3, 16, 16)}
    assert loaded.shapes["output"] == (4, 16, 8, 8)
    assert loaded.notes == []


def test_static_model_accepts_its_own_shape(base):
    loaded = load_model(base["static"], {"input": (1, 3, 16, 16)})
    assert loaded.input_shapes == {"input": (1, 3, 16, 16)}


@pytest.mark.parametrize("tokens", [6, 10])
def test_dynamic_token_axis_loads_with_input_shape(base, tokens):
    loaded = load_model(base["tokens"], {"input": (1, tokens, 16)})
    assert loaded.input_shapes == {"input": (1, tokens, 16)}
    assert loaded.shapes["output"] == (1, tokens, 16)


def test_dynamic_token_axis_flops_grow_with_tokens(base):
    from onnx_morph import analyze

    six = analyze(base["tokens"], input_shapes={"input": (1, 6, 16)}).total
    static = analyze(zoo.export_onnx(zoo.ZOO["TransformerBlock"][0](), (1, 6, 16),
                                     base["tokens"].parent / "transformer_static.onnx")).total
    twelve = analyze(base["tokens"], input_shapes={"input": (1, 12, 16)}).total
    assert six.flops == static.flops
    assert twelve.flops > six.flops
    assert twelve.params == six.params


def test_load_from_in_memory_modelproto(base):
    model = onnx.load(str(base["static"]))
    from_path = load_model(base["static"])
    loaded = load_model(model)
    assert loaded.source == "<model>"
    assert loaded.base_dir is None
    assert loaded.opset == from_path.opset
    assert loaded.shapes == from_path.shapes
    assert loaded.dtypes == from_path.dtypes
    np.testing.assert_array_equal(loaded.constant("conv1.weight"), from_path.constant("conv1.weight"))


def test_in_memory_modelproto_errors_say_model(base):
    model = onnx.load(str(base["static"]))
    with pytest.raises(OptionError) as info:
        load_model(model, {"nope": (1,)})
    assert "<model>" in str(info.value) and "nope" in str(info.value)


def test_in_memory_modelproto_is_not_modified(base):
    model = onnx.load(str(base["dynbatch"]))
    before = model.SerializeToString()
    load_model(model)
    load_model(model, {"input": (2, 3, 16, 16)})
    assert model.SerializeToString() == before


# --------------------------------------------------------------------------- #
# parse_input_shapes
# --------------------------------------------------------------------------- #


def test_parse_input_shapes_valid():
    assert parse_input_shapes([]) == {}
    assert parse_input_shapes(["input=1,3,224,224", "mask=2"]) == {"input": (1, 3, 224, 224), "mask": (2,)}
    # names may contain ':' or '.' (exporters produce such names)
    assert parse_input_shapes(["x.1:0=1,8"]) == {"x.1:0": (1, 8)}


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_parse_input_shapes_malformed(spec):
    with pytest.raises(OptionError) as info:
        parse_input_shapes([spec])
    message = str(info.value)
    assert f"'{spec}'" in message and "NAME=D0,D1" in message and "--input-shape" in message


def test_parse_input_shapes_reports_the_bad_one():
    with pytest.raises(OptionError) as info:
        parse_input_shapes(["input=1,3,16,16", "x=1,a"])
    assert "'x=1,a'" in str(info.value) and "input=1,3,16,16'" not in str(info.value)


# --------------------------------------------------------------------------- #
# Loading never modifies what it reads
# --------------------------------------------------------------------------- #


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_loading_never_modifies_files(base, tmp_path):
    from onnx_morph import analyze

    folder = tmp_path / "models"
    folder.mkdir()
    for key in ("static", "dynbatch", "tokens"):
        (folder / base[key].name).write_bytes(base[key].read_bytes())
    ext = save_external(base["static"], folder / "ext")
    os.utime(folder / base["static"].name, ns=(1_000_000_000, 1_000_000_000))  # a distinctive mtime
    before = _snapshot(folder)

    load_model(folder / base["static"].name)
    load_model(folder / base["dynbatch"].name)
    load_model(folder / base["tokens"].name, {"input": (1, 6, 16)})
    load_model(ext).constant("conv1.weight")
    analyze(ext, gamma_threshold=1.0)
    with pytest.raises(OptionError):
        load_model(folder / base["tokens"].name)

    assert _snapshot(folder) == before
