"""Resource functions in MorphNet's linearizable form: every cost as a polynomial of alive counts.

A row is one op (or one group of a grouped conv). With A the alive counts and R the summed
regularization vector over the row's input and output channels:

    cost = b * A_in * A_out + l_in * A_in + l_out * A_out + k
    reg  = b * (A_in * R_out + A_out * R_in) + l_in * R_in + l_out * R_out + dw * R_in

`dw` is non-zero only for depthwise convs, whose cost is linear in their tied channels and whose
regularizer is MorphNet's depthwise form coeff * (R_in + R_out). Latency rows have two parts,
compute and memory; an op costs the larger and is regularized through that one.

Channels that cannot die (a non-channel axis, a fixed weight dimension) point at one extra class,
`fixed`, that is always alive and never regularized. The same terms are evaluated in numpy here,
as ONNX nodes by the training rewrite, and in torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from onnx_morph.costs.hardware import Hardware
from onnx_morph.costs.measured import LatencyTable
from onnx_morph.costs.resources import _elements, _itemsize, param_uses
from onnx_morph.errors import OptionError
from onnx_morph.graph.channel_graph import ChannelGraph

RESOURCES = ("flops", "params", "activations", "latency")
COEFFICIENTS = ("bilinear", "in_linear", "out_linear", "constant", "depthwise")


@dataclass(frozen=True)
class CostRow:
    node: str
    in_classes: np.ndarray
    out_classes: np.ndarray
    bilinear: tuple[float, ...]
    in_linear: tuple[float, ...]
    out_linear: tuple[float, ...]
    constant: tuple[float, ...]
    depthwise: tuple[float, ...]


@dataclass(frozen=True)
class CostTerms:
    """The rows of one resource; classes index the channel graph's classes, plus `fixed`."""

    resource: str
    rows: list[CostRow]
    num_classes: int
    parts: int

    @property
    def fixed(self) -> int:
        return self.num_classes

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(row.node for row in self.rows))

    def counts(self, side: str) -> np.ndarray:
        """(rows, classes + 1) matrix: how many of a row's input (or output) channels each class holds."""
        return self._counts[side]

    @cached_property
    def _counts(self) -> dict[str, np.ndarray]:
        counts = {side: np.zeros((len(self.rows), self.num_classes + 1)) for side in ("in", "out")}
        for i, row in enumerate(self.rows):
            np.add.at(counts["in"][i], row.in_classes, 1.0)
            np.add.at(counts["out"][i], row.out_classes, 1.0)
        return counts

    def coefficients(self, name: str) -> np.ndarray:
        """(parts, rows) array of one of COEFFICIENTS."""
        return np.array([getattr(row, name) for row in self.rows], dtype=np.float64).reshape(len(self.rows), self.parts).T

    def row_nodes(self) -> np.ndarray:
        """(nodes, rows) 0/1 matrix summing rows into their op."""
        index = {n: i for i, n in enumerate(self.nodes)}
        matrix = np.zeros((len(index), len(self.rows)))
        for i, row in enumerate(self.rows):
            matrix[index[row.node], i] = 1.0
        return matrix

    def evaluate(self, alive: np.ndarray, vector: np.ndarray) -> tuple[float, float]:
        """(cost, regularization) for per-class alive flags and regularization values."""
        a = np.append(alive.astype(np.float64), 1.0)
        r = np.append(vector.astype(np.float64), 0.0)
        a_in, a_out = self.counts("in") @ a, self.counts("out") @ a
        r_in, r_out = self.counts("in") @ r, self.counts("out") @ r
        b, li, lo, k, dw = (self.coefficients(n) for n in COEFFICIENTS)
        cost = self.row_nodes() @ (b * a_in * a_out + li * a_in + lo * a_out + k).T
        reg = self.row_nodes() @ (b * (a_in * r_out + a_out * r_in) + li * r_in + lo * r_out + dw * r_in).T
        if self.parts == 1:
            return float(cost.sum()), float(reg.sum())
        active = cost[:, 0] >= cost[:, 1]
        return float(np.where(active, cost[:, 0], cost[:, 1]).sum()), float(np.where(active, reg[:, 0], reg[:, 1]).sum())


def cost_terms(
    graph: ChannelGraph,
    resource: str,
    *,
    macs: bool = False,
    hardware: Hardware | None = None,
    nodes: set[str] | None = None,
) -> CostTerms:
    """The rows of `resource` over the ops in `nodes` (all ops by default).

    Evaluated with every class alive, the cost equals `op_costs`' total for the same resource.
    """
    if resource not in RESOURCES:
        raise OptionError(f"unknown cost '{resource}': use one of {', '.join(RESOURCES)}")
    if resource == "latency" and hardware is None:
        raise OptionError("the latency cost needs a hardware (a name, or PEAK_GFLOPS,BANDWIDTH_GBS)")
    measured = resource == "latency" and isinstance(hardware, LatencyTable)
    if measured:
        hardware.check(graph)
    fixed = graph.num_classes
    rows: list[CostRow] = []
    uses = param_uses(graph)
    for name, relation in graph.relations.items():
        if nodes is not None and name not in nodes:
            continue
        geometry = relation.geometry
        if geometry is not None:
            c_in = _channel_classes(graph, geometry.input, geometry.in_axis, fixed)
            c_out = _channel_classes(graph, geometry.output, geometry.out_axis, fixed)
            if measured:
                rows += _measured_rows(name, c_in, c_out, hardware)
            else:
                rows += _geometry_rows(graph, name, geometry, c_in, c_out, resource, macs, hardware,
                                       uses[name].per_pair)
        if resource == "params":
            for term in uses[name].terms:
                classes = graph.classes(term.tensor) if term.tensor is not None else None
                if classes is None or classes.size == 0:
                    rows.append(_row(name, (), (), k=float(term.size)))
                else:
                    rows.append(_row(name, (), classes, lo=term.size / classes.size))
    if measured and rows:
        rows[0] = replace(rows[0], constant=(rows[0].constant[0] + hardware.overhead_seconds,))
    return CostTerms(resource, rows, fixed, 2 if resource == "latency" and not measured else 1)


def _measured_rows(name: str, c_in: np.ndarray, c_out: np.ndarray, table: LatencyTable) -> list[CostRow]:
    """MorphNet's linearization of a measured op: its latency at the current (full) widths, with the
    table's slopes in alive input and output channels (a tied op: in its output channels only)."""
    op = table.ops.get(name)
    if op is None:
        return []
    s_in, s_out = table.slopes(name, op.in_width, op.out_width)
    value = table.op_latency(name, op.in_width, op.out_width)
    return [_row(name, c_in, c_out, li=s_in, lo=s_out, k=value - s_in * op.in_width - s_out * op.out_width)]


def _channel_classes(graph: ChannelGraph, tensor: str, axis: int, fixed: int) -> np.ndarray:
    info = graph.tensors.get(tensor)
    classes = graph.axis_classes(tensor, axis) if info is not None else None
    if classes is None:
        shape = info.shape if info is not None else graph.model.shapes.get(tensor)
        return np.full(shape[axis] if shape is not None else 0, fixed, dtype=np.int64)
    return classes


def _geometry_rows(graph, name, geometry, c_in, c_out, resource, macs, hardware, params_per_pair) -> list[CostRow]:
    groups = geometry.groups
    if groups <= 1 or c_in.size % groups or c_out.size % groups:
        groups = 1
    per_pair = {
        "flops": (1 if macs else 2) * geometry.positions * geometry.kernel,
        "params": params_per_pair,
        "activations": 0,
    }
    if resource == "activations":
        return [_row(name, c_in, c_out, lo=1.0)]
    if resource == "latency":
        bandwidth = hardware.bandwidth_gbs * 1e9
        compute = 2 * geometry.positions * geometry.kernel / (hardware.peak_gflops * 1e9)
        weight_size = _itemsize(graph, geometry.second_input or geometry.weight, geometry.output)
        weight_bytes = weight_size * geometry.kernel / bandwidth if geometry.weight is not None else 0.0
        second = weight_size * _elements(graph, geometry.second_input) / bandwidth if geometry.second_input else 0.0
        per_in = _itemsize(graph, geometry.input) * _elements(graph, geometry.input) / max(c_in.size, 1) / bandwidth
        per_out = _itemsize(graph, geometry.output) * _elements(graph, geometry.output) / max(c_out.size, 1) / bandwidth
        fixed = 2 * geometry.fixed_macs / (hardware.peak_gflops * 1e9)
        return [_row(name, i, o, b=(compute, weight_bytes), li=(0.0, per_in), lo=(0.0, per_out),
                     k=(fixed * share, second * share), depthwise=dw)
                for i, o, share, dw in _split_groups(c_in, c_out, groups)]
    coefficient = float(per_pair[resource])
    fixed = (1 if macs else 2) * geometry.fixed_macs if resource == "flops" else 0.0
    return [_row(name, i, o, b=coefficient, k=fixed * share, depthwise=dw)
            for i, o, share, dw in _split_groups(c_in, c_out, groups)]


def _split_groups(c_in: np.ndarray, c_out: np.ndarray, groups: int):
    """(in classes, out classes, share of the op, depthwise flag) per row.

    A depthwise conv (one input channel per group) is one row whose cost is linear in its
    tied channels; other grouped convs get a row per group.
    """
    if groups > 1 and c_in.size == groups:
        yield c_in, c_out, 1.0, 1.0
        return
    for i, o in zip(np.split(c_in, groups), np.split(c_out, groups)):
        yield i, o, 1.0 / groups, 0.0


def _row(node, in_classes, out_classes, *, b=0.0, li=0.0, lo=0.0, k=0.0, depthwise: float = 0.0) -> CostRow:
    """A row; a depthwise row's bilinear coefficient becomes linear in its tied output channels."""
    b, li, lo, k = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (b, li, lo, k)))
    dw = depthwise * b
    if depthwise:
        lo, b = lo + b, np.zeros_like(b)
    return CostRow(node, np.asarray(in_classes, dtype=np.int64), np.asarray(out_classes, dtype=np.int64),
                   *(tuple(map(float, v)) for v in (b, li, lo, k, dw)))
