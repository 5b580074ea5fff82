"""Resource functions, each written once: every op's cost in a resource as a cost polynomial.

MorphNet's conventions: FLOPs count 2 per multiply-accumulate (MACs on request) and only for ops
with a bilinear weight (Conv, ConvTranspose, Gemm, MatMul) that run on activations: ops on
constants only (a conv of a fixed position grid) are computed once, when a runtime folds the
constant subgraph at load time, and cost no FLOPs. Parameters count every float initializer that
the computation on activations reads (see `costs.params`). Activations count alive output channels
of the FLOP ops; memory counts the bytes they read and write; latency is their roofline time,
max(FLOPs / peak, bytes / bandwidth), or a measured table's linearization at full width.

`op_costs`, `total_cost` and `marginal_cost` (costs.resources) evaluate these polynomials; the
regularizer linearizes them (see costs.polynomial for the form).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx

from onnx_morph.costs.hardware import Hardware
from onnx_morph.costs.measured import LatencyTable
from onnx_morph.costs.params import ParamUse, param_uses
from onnx_morph.costs.polynomial import COEFFICIENTS, CostRow, CostTerms, Polynomial, channel_classes, split_rows
from onnx_morph.errors import OptionError
from onnx_morph.graph.channel_graph import ChannelGraph
from onnx_morph.handlers import OpGeometry, ParamTerm

RESOURCES = ("flops", "params", "activations", "latency")

__all__ = ["COEFFICIENTS", "RESOURCES", "CostRow", "CostTerms", "cost_terms"]


def cost_terms(
    graph: ChannelGraph,
    resource: str,
    *,
    macs: bool = False,
    hardware: Hardware | LatencyTable | None = None,
    nodes: set[str] | None = None,
) -> CostTerms:
    """The rows of `resource` over the ops in `nodes` (all ops by default): one of RESOURCES, or
    'memory' (bytes read and written), which `op_costs` reports and the regularizer does not offer.

    Evaluated with every class alive, the cost equals `op_costs`' total for the same resource.
    """
    if resource not in RESOURCES and resource != "memory":
        raise OptionError(f"unknown cost '{resource}': use one of {', '.join(RESOURCES)}")
    if resource == "latency" and hardware is None:
        raise OptionError("the latency cost needs a hardware (a name, or PEAK_GFLOPS,BANDWIDTH_GBS)")
    measured = resource == "latency" and isinstance(hardware, LatencyTable)
    if measured:
        hardware.check(graph)
    uses = param_uses(graph) if resource == "params" else {}
    rows: list[CostRow] = []
    for name, relation in graph.relations.items():
        if nodes is not None and name not in nodes:
            continue
        geometry = relation.geometry
        if geometry is not None:
            c_in = channel_classes(graph, geometry.input, geometry.in_axis)
            c_out = channel_classes(graph, geometry.output, geometry.out_axis)
            if measured:
                rows += _measured_rows(name, c_in, c_out, hardware)
            else:
                poly = _op_polynomial(graph, geometry, c_in, c_out, resource, macs, hardware, uses.get(name))
                rows += split_rows(name, c_in, c_out, geometry.groups, poly)
        for term in uses[name].terms if uses else ():
            rows += _param_term_rows(graph, name, term)
    if measured and rows:
        rows[0] = replace(rows[0], constant=(rows[0].constant[0] + hardware.overhead_seconds,))
    return CostTerms(resource, rows, graph.num_classes, 2 if resource == "latency" and not measured else 1)


def _op_polynomial(graph: ChannelGraph, geometry: OpGeometry, c_in: np.ndarray, c_out: np.ndarray, resource: str,
                   macs: bool, hardware: Hardware | None, use: ParamUse | None) -> Polynomial:
    """One op's cost in `resource`, before its split into groups."""
    if resource == "flops":
        per_mac = 1 if macs else 2
        return Polynomial(bilinear=(per_mac * geometry.positions * geometry.kernel,), constant=(per_mac * geometry.fixed_macs,))
    if resource == "params":
        return Polynomial(bilinear=(float(use.per_pair),))
    if resource == "activations":
        return Polynomial(out_linear=(1.0,))
    memory = _memory_polynomial(graph, geometry, c_in, c_out)
    if resource == "memory":
        return memory
    compute = _op_polynomial(graph, geometry, c_in, c_out, "flops", False, None, None)
    return compute.over(hardware.peak_gflops * 1e9).beside(memory.over(hardware.bandwidth_gbs * 1e9))


def _memory_polynomial(graph: ChannelGraph, geometry: OpGeometry, c_in: np.ndarray, c_out: np.ndarray) -> Polynomial:
    """Bytes an op reads and writes: its input and output (per alive channel, at their stored precision),
    its weight (per channel pair), or the whole second operand of a product of two activations."""
    weight_size = _itemsize(graph, geometry.second_input or geometry.weight, geometry.output)
    return Polynomial(
        bilinear=(weight_size * geometry.kernel if geometry.weight is not None else 0,),
        in_linear=(_itemsize(graph, geometry.input) * _elements(graph, geometry.input) / max(c_in.size, 1),),
        out_linear=(_itemsize(graph, geometry.output) * _elements(graph, geometry.output) / max(c_out.size, 1),),
        constant=(weight_size * _elements(graph, geometry.second_input) if geometry.second_input else 0,),
    )


def _param_term_rows(graph: ChannelGraph, name: str, term: ParamTerm) -> list[CostRow]:
    """A parameter's size, scaled by the alive fraction of its tensor when it has one."""
    classes = graph.classes(term.tensor) if term.tensor is not None else None
    none = np.zeros(0, dtype=np.int64)
    if classes is None or classes.size == 0:
        return split_rows(name, none, none, 1, Polynomial(constant=(float(term.size),)))
    return split_rows(name, none, classes, 1, Polynomial(out_linear=(term.size / classes.size,)))


def _measured_rows(name: str, c_in: np.ndarray, c_out: np.ndarray, table: LatencyTable) -> list[CostRow]:
    """MorphNet's linearization of a measured op: its latency at the current (full) widths, with the
    table's slopes in alive input and output channels (a tied op: in its output channels only)."""
    op = table.ops.get(name)
    if op is None:
        return []
    s_in, s_out = table.slopes(name, op.in_width, op.out_width)
    value = table.op_latency(name, op.in_width, op.out_width)
    poly = Polynomial(in_linear=(s_in,), out_linear=(s_out,), constant=(value - s_in * op.in_width - s_out * op.out_width,))
    return split_rows(name, c_in, c_out, 1, poly)


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
