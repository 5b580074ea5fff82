"""Running models in onnxruntime to measure removed channels' constants and to check a pruned
model against the original."""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.errors import ModelLoadError, OptionError
from onnx_morph.graph import ChannelGraph
from onnx_morph.graph.channel_graph import node_view
from onnx_morph.graph.dependence import IndexRange, integer_input_ranges
from onnx_morph.graph.load import check_fits
from onnx_morph.handlers import handler_for
from onnx_morph.handlers.base import channel_ids
from onnx_morph.rewrite.editing import drop_unused


@dataclass(frozen=True)
class Deviation:
    """Largest output differences over `samples` random inputs."""

    max_abs: float
    max_rel: float
    samples: int


def onnxruntime():
    """Import onnxruntime without the ORTModule probe that onnxruntime-training's __init__ runs only
    to report build info; it imports torch, about 1.5 s, and inference never needs it."""
    if "onnxruntime" not in sys.modules:
        probe = "onnxruntime.training.ortmodule"
        blocked = probe not in sys.modules
        if blocked:
            sys.modules[probe] = None  # makes the probe's import fail fast
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise OptionError("running models needs onnxruntime: pip install 'onnx-morph[cpu]' (inference), or "
                              "'onnx-morph[train]' (training, inference included)") from None
        finally:
            if blocked and sys.modules.get(probe, 0) is None:
                del sys.modules[probe]
    return sys.modules["onnxruntime"]


def onnxruntime_training():
    """onnxruntime-training's Python module, or the one-line reason it is missing: it ships its own
    `onnxruntime` module, which a plain onnxruntime installed over it replaces."""
    ort = onnxruntime()
    try:
        for part in ("api", "artifacts", "onnxblock"):
            importlib.import_module(f"onnxruntime.training.{part}")
    except ImportError as exc:
        raise OptionError(f"training needs onnxruntime-training ({exc}); onnxruntime {ort.__version__} is installed: "
                          "pip install 'onnx-morph[train]' in an environment without the plain onnxruntime "
                          "(both install the module onnxruntime)") from None
    return ort.training


def random_inputs(graph: ChannelGraph, samples: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Standard normal floats; integer inputs uniform over their valid values (integer_input_ranges:
    token ids below the size of the embedding table that reads them, 0/1 where nothing bounds them),
    so that every sample differs from the others, as real inputs do."""
    _check_run_memory(graph)
    ranges = integer_input_ranges(graph)
    rng = np.random.default_rng(seed)
    return [{name: _random_input(graph, name, shape, ranges.get(name), rng)
             for name, shape in graph.model.input_shapes.items()} for _ in range(samples)]


# Probe inputs: float scales, and samples 1 and 2 hold integer inputs at the ends of their range,
# so that a channel fed by a low-entropy input (a flag, a token type) shows that it varies.
_PROBE_SCALES = (1.0, 4.0, 0.25, 1.0)


def probe_inputs(graph: ChannelGraph, samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs chosen to make channels that depend on the inputs show it: floats at several scales
    (a saturated channel moves at another); integer inputs random (the first sample alone shows
    most channels vary over positions), then all lowest, all highest, then random again."""
    feeds = random_inputs(graph, samples, seed)
    ranges = integer_input_ranges(graph)
    for index, feed in enumerate(feeds):
        for name, value in feed.items():
            if name in ranges and index in (1, 2):
                feed[name] = np.full_like(value, 0 if index == 1 else ranges[name].high - 1)
            elif name not in ranges:
                feed[name] = (value * _PROBE_SCALES[index % len(_PROBE_SCALES)]).astype(value.dtype)
    return feeds


def random_feed(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard normal values for float inputs, zeros for the others (indices, masks)."""
    feed = {}
    for name, shape in shapes.items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(dtypes.get(name, onnx.TensorProto.FLOAT))
        feed[name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
    return feed


def input_notes(graph: ChannelGraph) -> list[str]:
    """What the prune report says about integer inputs whose valid values the model does not bound."""
    return [f"integer input '{name}' is not read as indices into a table: verification fed it random 0/1 values"
            for name, bound in integer_input_ranges(graph).items() if bound.evidence is None]


def _random_input(graph: ChannelGraph, name: str, shape, bound: IndexRange | None, rng) -> np.ndarray:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(name, onnx.TensorProto.FLOAT))
    if bound is None:
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, bound.high, size=shape).astype(dtype)


def _check_run_memory(graph: ChannelGraph) -> None:
    """Refuse before allocating when one activation alone (or the inputs) would not fit in memory."""
    loaded = graph.model

    def nbytes(name: str) -> int:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(loaded.dtypes.get(name) or onnx.TensorProto.FLOAT)
        return int(np.prod(loaded.shapes[name], dtype=object)) * np.dtype(dtype).itemsize

    activations = [n for n in loaded.shapes if not loaded.is_constant(n)]
    if activations:
        largest = max(activations, key=nbytes)
        inputs = sum(nbytes(n) for n in loaded.input_shapes)
        check_fits(loaded.source, max(nbytes(largest), inputs),
                   f"onnxruntime runs on random inputs (tensor '{largest}' of shape {list(loaded.shapes[largest])} alone)")


def runtime_errors(ort) -> tuple[type, ...]:
    state = ort.capi.onnxruntime_pybind11_state
    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


Feeds = list[dict[str, np.ndarray]]


def run(graph: ChannelGraph, model: onnx.ModelProto | bytes | str, feeds: Feeds, extra_outputs: list[str] = (),
        then: Callable[[list[list[np.ndarray]]], Feeds] | None = None, plain: Feeds = ()) -> list[list[np.ndarray]]:
    """Outputs of `model` and then the `extra_outputs` intermediate tensors, for each feed, in one
    session; `then`, given those results, may ask for more feeds, run alike after them; the `plain`
    feeds come last and fetch the model's own outputs only. `model` may be the model's protobuf
    bytes, or the path of a file that holds them (see model_file), with
    with_outputs(graph, extra_outputs) appended, when the caller has them.

    When onnxruntime cannot load or run the input model itself (an op it lacks, a contradiction
    onnx's checker misses), that is the input's fault: a ModelLoadError. A failure only of a model
    derived from it is onnx-morph's, and propagates as is.
    """
    ort = onnxruntime()
    errors = runtime_errors(ort)
    try:
        return _run(ort, graph, model, feeds, extra_outputs, then, plain)
    except errors:
        try:
            _run(ort, graph, graph.model.materialized(), [*feeds, *plain][:1], ())
        except errors as original:
            message = " ".join(str(original).split())
            raise ModelLoadError(f"{graph.model.source}: onnxruntime {ort.__version__} cannot run the model: "
                                 f"{message[:300]}") from None
        raise


def _run(ort, graph: ChannelGraph, model: onnx.ModelProto | bytes | str, feeds: Feeds, extra_outputs,
         then=None, plain: Feeds = ()) -> list[list[np.ndarray]]:
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString() + with_outputs(graph, extra_outputs)
    session = ort.InferenceSession(model, reference_options(ort), providers=["CPUExecutionProvider"])
    del model
    own = [o.name for o in session.get_outputs()[:len(session.get_outputs()) - len(extra_outputs)]]
    results = [session.run(None, feed) for feed in feeds]
    if then is not None:
        results += [session.run(None, feed) for feed in then(results)]
    return results + [session.run(own, feed) for feed in plain]


@contextmanager
def model_file(parts: list | None) -> Iterator[str | bytes | None]:
    """The model bytes `parts` (see LoadedModel.encoded_parts) as the path of an anonymous file in
    memory: onnxruntime loads a path for about half the CPU time and memory that the same bytes
    cost it (it copies bytes several times over). The joined bytes where the platform has no
    memfd_create; None for None (a model past protobuf's limit)."""
    fd = None
    if parts is not None and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.memfd_create("onnx-morph-model", os.MFD_CLOEXEC)
            with open(fd, "wb", closefd=False) as f:
                for part in parts:
                    f.write(part)
        except OSError:  # no memfd (a sandbox), or no memory for it: the bytes, as before
            if fd is not None:
                os.close(fd)
            fd = None
    if fd is None:
        yield None if parts is None else b"".join(parts)
        return
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def session_options(ort):
    """Options for a session that runs a few times: quiet, and with workers that sleep between runs
    (spinning, onnxruntime's default, burns a core for a while after each run; the results are the same)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def reference_options(ort):
    """`session_options` for runs that decide or check what a model computes: ONNX's semantics through
    onnxruntime's kernels, without graph rewrites. Both models compared then run the same way whatever
    their differences in shape (a fusion applied to one and not the other would show as a deviation),
    and a session builds in a third of the time, which for the few runs here is most of their cost."""
    options = session_options(ort)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def with_outputs(graph: ChannelGraph, names: list[str]) -> bytes:
    """Protobuf bytes that, appended to a serialized model, add `names` to its graph's outputs: a
    parser merges a message field that occurs twice (the graph) and appends to its repeated fields
    (the outputs), so the model's weights need not be copied and encoded again."""
    if not names:
        return b""
    appendix = onnx.ModelProto()
    appendix.graph.output.extend(onnx.helper.make_tensor_value_info(
        name, graph.model.dtypes.get(name, onnx.TensorProto.FLOAT), None) for name in names)
    return appendix.SerializeToString()


def deviation(expected: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> Deviation:
    worst_abs = worst_rel = 0.0
    for e_run, a_run in zip(expected, actual):
        for e, a in zip(e_run, a_run):
            e, a = np.asarray(e, dtype=np.float64), np.asarray(a, dtype=np.float64)
            if not e.size:
                continue
            diff, scale = float(np.max(np.abs(e - a))), float(np.max(np.abs(e)))
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / scale if scale else diff)
    return Deviation(worst_abs, worst_rel, len(expected))


def masked_original(
    graph: ChannelGraph, original: onnx.ModelProto, masks: dict[str, np.ndarray],
    folded: dict[tuple[str, str], np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The original model with every removed channel multiplied by zero wherever it appears, except
    where a consumer folded the channel's constant into its bias: there the channel holds the value
    it has in the unmasked original (computed by a copy of the original's nodes). Where the channel
    really is that constant, the pruned model computes exactly this; where it is not (a fold decided
    from samples that happened to agree), the deviation shows it.
    Channels that are copies of one value (a broadcast norm) stay: their removal changes nothing else."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    renamed: dict = {}
    extra_nodes, extra_inits = [], []
    produced = {o for n in model.graph.node for o in n.output}
    dequantized = _dequantized_only(graph)
    for tensor, keep in masks.items():
        info = graph.tensors[tensor]
        if info.axes is None or info.copies or tensor in dequantized:
            continue
        keep = keep[channel_ids(info)]
        shape = list(keep.shape)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(tensor, onnx.TensorProto.FLOAT))
        mask_name, out_name = f"{tensor}::mask", f"{tensor}::masked"
        if dtype.kind in "iu":
            unmasked = tensor + _UNMASKED if tensor in produced else tensor
            for key, (held, name) in _integer_variants(info, keep, out_name, folded).items():
                inits, nodes = _integer_mask(graph, tensor, keep, name, (unmasked, held))
                extra_inits += inits
                extra_nodes += [(tensor, node) for node in nodes]
                renamed[key] = name
            continue
        extra_inits.append(numpy_helper.from_array(keep.astype(dtype).reshape(shape), mask_name))
        extra_nodes.append((tensor, onnx.helper.make_node("Mul", [tensor, mask_name], [out_name], name=mask_name)))
        renamed[tensor] = out_name
        for (node_name, folded_tensor), values in (folded or {}).items():
            if folded_tensor != tensor:
                continue
            folded_only = (~keep.astype(bool) & (values != 0)[channel_ids(info)]).astype(dtype)
            folded_mask, kept_name = f"{tensor}::folded_mask", f"{tensor}::with_constants"
            unmasked = tensor + _UNMASKED if tensor in produced else tensor
            if kept_name not in renamed.values():
                extra_inits.append(numpy_helper.from_array(folded_only.reshape(shape), folded_mask))
                extra_nodes.append((tensor, onnx.helper.make_node(
                    "Mul", [unmasked, folded_mask], [f"{tensor}::folded_values"], name=folded_mask)))
                extra_nodes.append((tensor, onnx.helper.make_node(
                    "Add", [out_name, f"{tensor}::folded_values"], [kept_name], name=kept_name)))
            renamed[(node_name, tensor)] = kept_name
    _splice(graph, model, _unmasked_copy(model) if folded else [], extra_nodes, renamed)
    model.graph.initializer.extend(extra_inits)
    del model.graph.value_info[:]
    drop_unused(model.graph)  # the copy's nodes that no folded channel needs
    return model


def _integer_variants(info, keep: np.ndarray, out_name: str, folded: dict | None) -> dict:
    """The masked versions of an integer tensor: one for every consumer, and one per consumer that
    folded removed channels' constants, which holds those channels at their original value."""
    variants = {info.name: (np.zeros_like(keep, dtype=bool), out_name)}
    for (node_name, tensor), values in (folded or {}).items():
        if tensor == info.name:
            variants[(node_name, tensor)] = (~keep.astype(bool) & (values != 0)[channel_ids(info)],
                                             f"{out_name}::{node_name}")
    return variants


def _integer_mask(graph: ChannelGraph, tensor: str, keep: np.ndarray, out_name: str,
                  constants: tuple[str, np.ndarray]):
    """Removed channels of an integer tensor set to its zero: the zero point of a quantized tensor
    (its producer's, see zero_of), else 0, except those where `constants` says (the unmasked
    original's tensor and where) a consumer folded them; computed in double, which holds every int32."""
    zero = 0.0
    producer = next((name for name, node in graph.nodes.items() if tensor in node.output), None)
    if producer is not None:
        node = graph.nodes[producer]
        name = handler_for(node.op_type, node.domain).zero_of(node_view(graph, producer))
        value = None if name is None else graph.constant(name)
        if value is not None and value.size == 1:
            zero = float(value.reshape(()))
    mask, fill = f"{out_name}::mask", f"{out_name}::zero_fill"
    dtype = graph.model.dtypes.get(tensor)
    make = onnx.helper.make_node
    unmasked, held = constants
    keep = keep.astype(bool)
    inits = [numpy_helper.from_array(keep.astype(np.float64), mask),
             numpy_helper.from_array((~keep & ~held).astype(np.float64) * zero, fill)]
    nodes = [make("Cast", [tensor], [f"{out_name}::double"], to=onnx.TensorProto.DOUBLE, name=f"{out_name}::double"),
             make("Mul", [f"{out_name}::double", mask], [f"{out_name}::kept"], name=mask),
             make("Add", [f"{out_name}::kept", fill], [f"{out_name}::filled"], name=fill)]
    last = f"{out_name}::filled"
    if held.any():
        inits.append(numpy_helper.from_array(held.astype(np.float64), f"{out_name}::held"))
        nodes += [make("Cast", [unmasked], [f"{out_name}::original"], to=onnx.TensorProto.DOUBLE, name=f"{out_name}::original"),
                  make("Mul", [f"{out_name}::original", f"{out_name}::held"], [f"{out_name}::constants"],
                       name=f"{out_name}::held"),
                  make("Add", [last, f"{out_name}::constants"], [f"{out_name}::with_constants"],
                       name=f"{out_name}::with_constants")]
        last = f"{out_name}::with_constants"
    nodes.append(make("Cast", [last], [out_name], to=dtype, name=out_name))
    return inits, nodes


def _dequantized_only(graph: ChannelGraph) -> set[str]:
    """Integer tensors read only by ops that dequantize them (a QDQ model's quantized activations):
    a zero is no zero there (it stands for the zero point), and the dequantized tensors, in the same
    channel groups, are masked instead."""
    readers: dict[str, list[bool]] = {}
    for node in graph.nodes.values():
        dequantizes = handler_for(node.op_type, node.domain).stored_as_input
        for tensor in node.input:
            readers.setdefault(tensor, []).append(dequantizes)
    outputs = {o.name for o in graph.model.graph.output}
    return {t for t, flags in readers.items() if all(flags) and t not in outputs
            and graph.model.dtypes.get(t) in _INTEGER_TYPES}


_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                  onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _splice(graph: ChannelGraph, model: onnx.ModelProto, first: list[onnx.NodeProto],
            extra_nodes: list[tuple[str, onnx.NodeProto]], renamed: dict) -> None:
    """Put `first`, then the model's nodes, each followed by the extra nodes that read its output,
    and point every node's inputs at their renamed (masked) versions."""
    producer_of = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    nodes = list(first)
    for tensor, node in extra_nodes:
        if tensor in producer_of:
            inserts.setdefault(producer_of[tensor], []).append(node)
        else:
            nodes.append(node)
    for index, (name, node) in enumerate(zip(graph.order, model.graph.node)):
        for i, tensor in enumerate(node.input):
            node.input[i] = renamed.get((name, tensor), renamed.get(tensor, tensor))
        nodes.append(node)
        nodes.extend(inserts.get(index, []))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


_UNMASKED = "::unmasked"


def _unmasked_copy(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The model's nodes with every computed tensor renamed: they compute the original's values
    beside the masked ones (only inputs and initializers are shared)."""
    produced = {o for n in model.graph.node for o in n.output if o}
    copies = []
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = node.name + _UNMASKED
        for i, name in enumerate(copy.input):
            if name in produced:
                copy.input[i] = name + _UNMASKED
        for i, name in enumerate(copy.output):
            if name:
                copy.output[i] = name + _UNMASKED
        copies.append(copy)
    return copies
