"""Resource functions: the cost of every op as a function of its alive input and output channels.

MorphNet's conventions: FLOPs count 2 per multiply-accumulate (MACs on request) and only for ops
with a bilinear weight (Conv, ConvTranspose, Gemm, MatMul) that run on activations: ops on
constants only (a conv of a fixed position grid) are computed once, when a runtime folds the
constant subgraph at load time, and cost no FLOPs. Parameters count every float initializer that
the computation on activations reads (weights, biases, norm scales and shifts; not BatchNorm
running statistics), directly at each use, or through a constant subgraph (a gathered position
table, an unsqueezed scale, a normalized weight) once per computed tensor. Activations count
alive output channels of the FLOP ops; memory counts the bytes they read and write; latency is
their roofline time, max(FLOPs / peak, bytes / bandwidth), summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_morph.costs.hardware import Hardware
from onnx_morph.costs.measured import LatencyTable
from onnx_morph.graph.channel_graph import ChannelGraph
from onnx_morph.handlers import OpGeometry, ParamTerm, handler_for


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


@dataclass(frozen=True)
class ParamUse:
    """The trained elements one op reads: `per_pair` per (input, output) channel pair of its weight
    (the kernel size for a weight initializer), and terms whose size is the trained elements behind
    each other constant input, scaled by the alive fraction of the term's tensor when it has one."""

    per_pair: float
    terms: list[ParamTerm]


def param_uses(graph: ChannelGraph) -> dict[str, ParamUse]:
    """Every op's parameters. An initializer read directly counts at every use: exporters merge
    equal-valued initializers (all BatchNorm scales of a fresh model are ones), and each use is a
    parameter of its own layer. A constant computed from initializers counts them once, at its first
    reader (a relative position bias computed once and added in every block is one table)."""
    counted: set[str] = set()
    uses = {}
    for name, relation in graph.relations.items():
        covered: set[str] = set()
        per_pair = 0.0
        geometry = relation.geometry
        if geometry is not None and geometry.weight is not None:
            covered.add(geometry.weight)
            per_pair = _weight_per_pair(graph, geometry, _trained_elements(graph, geometry.weight, counted))
        terms = []
        for term in relation.params:
            covered.add(term.param)
            size = term.size if graph.param_root(term.param) is not None else _trained_elements(graph, term.param, counted)
            if size and graph.trained_sources(term.param):
                terms.append(ParamTerm(term.param, size, term.tensor))
        node = graph.nodes[name]
        indices = handler_for(node.op_type, node.domain).parameter_inputs
        for index, tensor in enumerate(node.input):
            if tensor in graph.static and tensor not in covered and graph.param_root(tensor) is None and (
                    indices is None or index in indices):
                size = _trained_elements(graph, tensor, counted)
                if size:
                    terms.append(ParamTerm(tensor, size))
        uses[name] = ParamUse(per_pair, terms)
    return uses


def _trained_elements(graph: ChannelGraph, tensor: str, counted: set[str]) -> int:
    """Elements of the float initializers behind a constant input; a computed constant counts once."""
    if graph.param_root(tensor) is None:
        if tensor in counted:
            return 0
        counted.add(tensor)
    return sum(math.prod(graph.model.initializer(name).dims) for name in graph.trained_sources(tensor))


def _weight_per_pair(graph: ChannelGraph, geometry: OpGeometry, elements: int) -> float:
    """Parameters per channel pair: the kernel for a weight initializer; a weight computed from several
    (weight norm's direction and gain) spreads them over the pairs."""
    if not elements:
        return 0.0
    if graph.param_root(geometry.weight) is not None:
        return float(geometry.kernel)
    pairs = bilinear_count(alive_along(graph, np.ones(graph.num_classes, bool), geometry.input, geometry.in_axis),
                           alive_along(graph, np.ones(graph.num_classes, bool), geometry.output, geometry.out_axis),
                           geometry.groups)
    return elements / pairs if pairs else 0.0


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
    pairs = bilinear_count(a_in, a_out, geometry.groups)
    return (1 if macs else 2) * (geometry.positions * geometry.kernel * pairs + geometry.fixed_macs)


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
    uses = param_uses(graph)
    for name, relation in graph.relations.items():
        node = graph.nodes[name]
        use = uses[name]
        geometry = relation.geometry
        params = 0.0
        flops = activations = 0
        memory = latency = 0.0
        if geometry is not None:
            a_in = alive_along(graph, alive, geometry.input, geometry.in_axis)
            a_out = alive_along(graph, alive, geometry.output, geometry.out_axis)
            in_alive, in_total, out_alive, out_total = int(a_in.sum()), a_in.size, int(a_out.sum()), a_out.size
            flops = flop_cost(geometry, a_in, a_out, macs)
            pairs = bilinear_count(a_in, a_out, geometry.groups)
            weights = geometry.kernel * pairs
            params += use.per_pair * pairs
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
        for term in use.terms:
            params += term.size * _tensor_fraction(graph, alive, term.tensor)
        costs.append(OpCost(name, node.op_type, in_alive, in_total, out_alive, out_total,
                            flops, params, activations, memory, latency))
    return costs


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
    uses = param_uses(graph)
    for name, relation in graph.relations.items():
        geometry = relation.geometry
        if geometry is not None:
            per_pair = 2 * geometry.positions * geometry.kernel if resource == "flops" else uses[name].per_pair
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
            for term in uses[name].terms:
                if term.tensor is not None and graph.classes(term.tensor) is not None:
                    classes = graph.classes(term.tensor)
                    np.add.at(saving, classes, term.size / classes.size)
    return saving


def _add(graph: ChannelGraph, saving: np.ndarray, tensor: str, axis: int, per_channel: np.ndarray) -> None:
    classes = graph.axis_classes(tensor, axis) if tensor in graph.tensors else None
    if classes is not None:
        np.add.at(saving, classes, per_channel)
