"""Resource functions: the cost of every op as a function of its alive input and output channels.

MorphNet's conventions: FLOPs count 2 per multiply-accumulate (MACs on request) and only for ops
with a bilinear weight (Conv, ConvTranspose, Gemm, MatMul); parameters count every trained
initializer at each use (weights, biases, norm scales and shifts; not BatchNorm running
statistics);
activations count alive output channels of those ops; memory counts the bytes they read and
write; latency is their roofline time, max(FLOPs / peak, bytes / bandwidth), summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_morph.costs.hardware import Hardware
from onnx_morph.costs.measured import LatencyTable
from onnx_morph.graph.channel_graph import ChannelGraph
from onnx_morph.handlers import OpGeometry

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# Integer weights and int32 biases of quantized ops (QLinearConv, ConvInteger, ...): parameters too.
_QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                    onnx.TensorProto.INT32}


@dataclass(frozen=True)
class OpCost:
    node: str
    op_type: str
    in_alive: int
    in_total: int
    out_alive: int
    out_total: int
    flops: float
    params: float
    activations: int
    memory_bytes: float
    latency_s: float


@dataclass(frozen=True)
class Totals:
    """Costs summed over the ops; latency only when a hardware was given."""

    flops: float
    params: float
    activations: int
    memory_bytes: float
    latency_s: float | None


def totals_of(ops: list[OpCost], hardware: Hardware | LatencyTable | None = None) -> Totals:
    """Sums over the ops; a measured table adds its fixed overhead to the latency."""
    latency = None
    if hardware is not None:
        latency = float(sum(op.latency_s for op in ops))
        if isinstance(hardware, LatencyTable):
            latency += hardware.overhead_seconds
    return Totals(
        flops=float(sum(op.flops for op in ops)),
        params=float(sum(op.params for op in ops)),
        activations=int(sum(op.activations for op in ops)),
        memory_bytes=float(sum(op.memory_bytes for op in ops)),
        latency_s=latency,
    )


def alive_along(graph: ChannelGraph, alive: np.ndarray, tensor: str, axis: int) -> np.ndarray:
    """Alive mask of the channels along `axis` of `tensor`; all alive if that axis is not its channel axis."""
    info = graph.tensors.get(tensor)
    shape = info.shape if info is not None else graph.model.shapes.get(tensor)
    classes = graph.axis_classes(tensor, axis) if info is not None else None
    if classes is None:
        return np.ones(shape[axis] if shape is not None else 0, dtype=bool)
    return alive[classes]


def bilinear_count(a_in: np.ndarray, a_out: np.ndarray, groups: int) -> int:
    """Sum over groups of alive inputs times alive outputs: the weight count per kernel position.

    `alive` may count copies of channels (expansion); a group's channels are one class, so a group
    copied r times is r groups, not one r times as wide."""
    if groups <= 1 or a_in.size % groups or a_out.size % groups:
        return int(a_in.sum()) * int(a_out.sum())
    per_in = a_in.reshape(groups, -1).sum(axis=1).astype(np.int64)
    per_out = a_out.reshape(groups, -1).sum(axis=1).astype(np.int64)
    copies = np.maximum(a_in.reshape(groups, -1).max(axis=1).astype(np.int64), 1)
    return int((per_in * per_out // copies).sum())


def flop_cost(geometry: OpGeometry, a_in: np.ndarray, a_out: np.ndarray, macs: bool = False) -> float:
    return (1 if macs else 2) * geometry.positions * geometry.kernel * bilinear_count(a_in, a_out, geometry.groups)


def op_costs(
    graph: ChannelGraph,
    alive: np.ndarray,
    *,
    macs: bool = False,
    hardware: Hardware | LatencyTable | None = None,
) -> list[OpCost]:
    """The cost of every non-static node, in graph order, under the given alive classes; latency is the
    roofline of `hardware`, or interpolated from a measured table (0 for ops it does not time)."""
    costs = []
    for name, relation in graph.relations.items():
        node = graph.nodes[name]
        geometry = relation.geometry
        params = 0.0
        flops = activations = 0
        memory = latency = 0.0
        if geometry is not None:
            a_in = alive_along(graph, alive, geometry.input, geometry.in_axis)
            a_out = alive_along(graph, alive, geometry.output, geometry.out_axis)
            in_alive, in_total, out_alive, out_total = int(a_in.sum()), a_in.size, int(a_out.sum()), a_out.size
            flops = flop_cost(geometry, a_in, a_out, macs)
            weights = geometry.kernel * bilinear_count(a_in, a_out, geometry.groups)
            if geometry.weight is not None and _is_parameter(graph, geometry.weight):
                params += weights
            activations = out_alive
            read_weights = weights if geometry.weight is not None else 0
            if geometry.second_input is not None:
                read_weights = _elements(graph, geometry.second_input)
            weight_type = geometry.second_input or geometry.weight
            memory = (
                _itemsize(graph, geometry.input) * _elements(graph, geometry.input) * _fraction(in_alive, in_total)
                + _itemsize(graph, geometry.output) * _elements(graph, geometry.output) * _fraction(out_alive, out_total)
                + (_itemsize(graph, weight_type, geometry.output) * read_weights if read_weights else 0)
            )
            if isinstance(hardware, LatencyTable):
                latency = hardware.op_latency(name, in_alive, out_alive)
            elif hardware is not None:
                full_flops = flops * (2 if macs else 1)
                latency = max(full_flops / (hardware.peak_gflops * 1e9), memory / (hardware.bandwidth_gbs * 1e9))
        else:
            in_alive, in_total = _channel_counts(graph, alive, node.input[0] if node.input else "")
            out_alive, out_total = _channel_counts(graph, alive, node.output[0] if node.output else "")
        for term in relation.params:
            if _is_parameter(graph, term.param):
                params += term.size * _tensor_fraction(graph, alive, term.tensor)
        costs.append(OpCost(name, node.op_type, in_alive, in_total, out_alive, out_total,
                            flops, params, activations, memory, latency))
    return costs


def _is_parameter(graph: ChannelGraph, name: str) -> bool:
    """A float initializer, or integers dequantized (a QDQ model's weights and biases), counted at
    every use: exporters merge equal-valued initializers (all BatchNorm scales of a fresh model are
    ones), and each use is a parameter of its own layer."""
    root = graph.param_root(name)
    if root is not None:
        return graph.model.initializer(root[0]).data_type in _FLOAT_TYPES | _QUANTIZED_TYPES
    return graph.stored_param(name) is not None


def _channel_counts(graph: ChannelGraph, alive: np.ndarray, tensor: str) -> tuple[int, int]:
    classes = graph.classes(tensor)
    if classes is None:
        return 0, 0
    return int(alive[classes].sum()), int(classes.size)


def _tensor_fraction(graph: ChannelGraph, alive: np.ndarray, tensor: str | None) -> float:
    if tensor is None:
        return 1.0
    alive_count, total = _channel_counts(graph, alive, tensor)
    return _fraction(alive_count, total)


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


def _elements(graph: ChannelGraph, tensor: str) -> int:
    shape = graph.model.shapes.get(tensor)
    return math.prod(shape) if shape is not None else 0


def _itemsize(graph: ChannelGraph, tensor: str | None, fallback: str | None = None) -> int:
    """Bytes per element at the precision the tensor is stored at (an int8 weight behind
    DequantizeLinear: 1); a weight of unknown storage counts at `fallback`'s (the output's)."""
    stored = graph.stored_param(tensor) if tensor is not None else None
    if stored is not None:
        dtype = graph.model.initializer(stored).data_type
    elif tensor is not None and (tensor in graph.tensors or fallback is None):
        dtype = graph.stored_dtype(tensor)
    else:
        dtype = graph.stored_dtype(fallback)
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).itemsize
    except (KeyError, TypeError):
        return 4


def total_cost(graph: ChannelGraph, alive: np.ndarray, resource: str) -> float:
    """Total FLOPs or parameters of the model under `alive`."""
    costs = op_costs(graph, alive)
    return float(sum(op.flops if resource == "flops" else op.params for op in costs))


def marginal_cost(graph: ChannelGraph, alive: np.ndarray, resource: str) -> np.ndarray:
    """Per class, how much FLOPs or parameters removing it alone would save (at the current alive set)."""
    saving = np.zeros(graph.num_classes)
    for relation in graph.relations.values():
        geometry = relation.geometry
        if geometry is not None:
            per_pair = geometry.kernel * (2 * geometry.positions if resource == "flops" else 1)
            if resource == "params" and (geometry.weight is None or not _is_parameter(graph, geometry.weight)):
                per_pair = 0
            a_in = alive_along(graph, alive, geometry.input, geometry.in_axis)
            a_out = alive_along(graph, alive, geometry.output, geometry.out_axis)
            groups = geometry.groups if a_in.size % max(geometry.groups, 1) == 0 and a_out.size % max(geometry.groups, 1) == 0 else 1
            in_per_group = a_in.reshape(groups, -1).sum(axis=1)
            out_per_group = a_out.reshape(groups, -1).sum(axis=1)
            _add(graph, saving, geometry.input, geometry.in_axis,
                 per_pair * np.repeat(out_per_group, a_in.size // groups))
            _add(graph, saving, geometry.output, geometry.out_axis,
                 per_pair * np.repeat(in_per_group, a_out.size // groups))
        if resource == "params":
            for term in relation.params:
                if term.tensor is not None and _is_parameter(graph, term.param) and graph.classes(term.tensor) is not None:
                    classes = graph.classes(term.tensor)
                    np.add.at(saving, classes, term.size / classes.size)
    return saving


def _add(graph: ChannelGraph, saving: np.ndarray, tensor: str, axis: int, per_channel: np.ndarray) -> None:
    classes = graph.axis_classes(tensor, axis) if tensor in graph.tensors else None
    if classes is not None:
        np.add.at(saving, classes, per_channel)
