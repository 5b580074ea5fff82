"""Running models in onnxruntime to measure removed channels' constants and to check a pruned
model against the original."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.errors import ModelLoadError
from onnx_morph.graph import ChannelGraph
from onnx_morph.graph.load import check_fits
from onnx_morph.handlers.layout import channel_ids


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
        finally:
            if blocked and sys.modules.get(probe, 0) is None:
                del sys.modules[probe]
    return sys.modules["onnxruntime"]


def random_inputs(graph: ChannelGraph, samples: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    _check_run_memory(graph)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed = {}
        for name, shape in graph.model.input_shapes.items():
            dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(name, onnx.TensorProto.FLOAT))
            feed[name] = rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
        feeds.append(feed)
    return feeds


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


def _ort_errors(ort) -> tuple[type, ...]:
    state = ort.capi.onnxruntime_pybind11_state
    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def run(graph: ChannelGraph, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
        extra_outputs: list[str] = ()) -> list[list[np.ndarray]]:
    """Outputs of `model` (then the `extra_outputs` intermediate tensors) for each feed, in one session.

    When onnxruntime cannot load or run the input model itself (an op it lacks, a contradiction
    onnx's checker misses), that is the input's fault: a ModelLoadError. A failure only of a model
    derived from it is onnx-morph's, and propagates as is.
    """
    ort = onnxruntime()
    errors = _ort_errors(ort)
    try:
        return _run(ort, graph, model, feeds, extra_outputs)
    except errors:
        try:
            _run(ort, graph, graph.model.materialized(), feeds[:1], ())
        except errors as original:
            message = " ".join(str(original).split())
            raise ModelLoadError(f"{graph.model.source}: onnxruntime {ort.__version__} cannot run the model: "
                                 f"{message[:300]}") from None
        raise


def _run(ort, graph: ChannelGraph, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
         extra_outputs) -> list[list[np.ndarray]]:
    if extra_outputs:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for name in extra_outputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(
                name, graph.model.dtypes.get(name, onnx.TensorProto.FLOAT), None))
        model = probe
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


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
    where a consumer folded the channel's constant into its bias: there the constant is kept.
    Channels that are copies of one value (a broadcast norm) stay: their removal changes nothing else."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    renamed: dict = {}
    extra_nodes, extra_inits = [], []
    for tensor, keep in masks.items():
        info = graph.tensors[tensor]
        if info.axes is None or info.copies:
            continue
        keep = keep[channel_ids(info)]
        shape = list(keep.shape)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(tensor, onnx.TensorProto.FLOAT))
        mask_name, out_name = f"{tensor}::mask", f"{tensor}::masked"
        extra_inits.append(numpy_helper.from_array(keep.astype(dtype).reshape(shape), mask_name))
        extra_nodes.append((tensor, onnx.helper.make_node("Mul", [tensor, mask_name], [out_name], name=mask_name)))
        renamed[tensor] = out_name
        for (node_name, folded_tensor), values in (folded or {}).items():
            if folded_tensor != tensor:
                continue
            const_name, kept_name = f"{tensor}::removed_values", f"{tensor}::with_constants"
            if kept_name not in renamed.values():
                extra_inits.append(numpy_helper.from_array(values.astype(dtype)[channel_ids(info)], const_name))
                extra_nodes.append((tensor, onnx.helper.make_node("Add", [out_name, const_name], [kept_name],
                                                                  name=const_name)))
            renamed[(node_name, tensor)] = kept_name
    producer_of = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    nodes = []
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
    model.graph.initializer.extend(extra_inits)
    del model.graph.value_info[:]
    return model
