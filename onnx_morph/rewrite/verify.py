"""Check a pruned model against the original with the removed channels masked to zero."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.graph import ChannelGraph


@dataclass(frozen=True)
class Deviation:
    """Largest output differences over `samples` random inputs."""

    max_abs: float
    max_rel: float
    samples: int


def masked_original(
    graph: ChannelGraph, masks: dict[str, np.ndarray], folded: dict[tuple[str, str], np.ndarray] | None = None
) -> onnx.ModelProto:
    """The original model with every removed channel multiplied by zero wherever it appears, except
    where a consumer folded the channel's constant into its bias: there the constant is kept."""
    model = graph.model.materialized()
    renamed = {}
    extra_nodes, extra_inits = [], []
    for tensor, keep in masks.items():
        info = graph.tensors[tensor]
        if info.axes is None or len(info.axes) != 1:
            continue
        shape = [1] * len(info.shape)
        shape[info.axes[0]] = keep.size
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(tensor, onnx.TensorProto.FLOAT))
        mask_name, out_name = f"{tensor}::mask", f"{tensor}::masked"
        extra_inits.append(numpy_helper.from_array(keep.astype(dtype).reshape(shape), mask_name))
        extra_nodes.append((tensor, onnx.helper.make_node("Mul", [tensor, mask_name], [out_name], name=f"{tensor}::mask")))
        renamed[tensor] = out_name
        for (node_name, folded_tensor), values in (folded or {}).items():
            if folded_tensor != tensor:
                continue
            const_name, kept_name = f"{tensor}::removed_values", f"{tensor}::with_constants"
            if kept_name not in renamed.values():
                extra_inits.append(numpy_helper.from_array(values.astype(dtype).reshape(shape), const_name))
                extra_nodes.append((tensor, onnx.helper.make_node("Add", [out_name, const_name], [kept_name],
                                                                  name=f"{tensor}::constants")))
            renamed[(node_name, tensor)] = kept_name
    nodes = []
    producer_of = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    leading = []
    for tensor, node in extra_nodes:
        if tensor in producer_of:
            inserts.setdefault(producer_of[tensor], []).append(node)
        else:
            leading.append(node)
    nodes.extend(leading)
    names = dict(zip(range(len(model.graph.node)), graph.order))
    for index, node in enumerate(model.graph.node):
        for i, name in enumerate(node.input):
            if (names[index], name) in renamed:
                node.input[i] = renamed[(names[index], name)]
            elif name in renamed:
                node.input[i] = renamed[name]
        nodes.append(node)
        nodes.extend(inserts.get(index, []))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(extra_inits)
    del model.graph.value_info[:]
    return model


def random_inputs(graph: ChannelGraph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for name, shape in graph.model.input_shapes.items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(name, onnx.TensorProto.FLOAT))
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_model(graph: ChannelGraph, model: onnx.ModelProto, tensors: list[str], seed: int = 0) -> list[np.ndarray]:
    """Values of intermediate `tensors` of `model` on one random input."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(
            name, graph.model.dtypes.get(name, onnx.TensorProto.FLOAT), None))
    return _session(probe).run(None, random_inputs(graph, np.random.default_rng(seed)))


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, graph: ChannelGraph, samples: int = 2, seed: int = 0) -> Deviation:
    """Run both models in onnxruntime on the same random inputs and measure the largest difference."""
    sessions = [_session(m) for m in (reference, candidate)]
    rng = np.random.default_rng(seed)
    worst_abs = worst_rel = 0.0
    for _ in range(samples):
        feeds = random_inputs(graph, rng)
        expected, actual = (s.run(None, feeds) for s in sessions)
        for e, a in zip(expected, actual):
            e, a = np.asarray(e, dtype=np.float64), np.asarray(a, dtype=np.float64)
            diff = float(np.max(np.abs(e - a))) if e.size else 0.0
            scale = float(np.max(np.abs(e))) if e.size else 0.0
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / scale if scale else diff)
    return Deviation(worst_abs, worst_rel, samples)
