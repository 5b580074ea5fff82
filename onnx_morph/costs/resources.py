"""The costs of a model under an alive set: evaluations of the cost polynomials (costs.terms).

`op_costs` evaluates every resource's polynomial per op, `total_cost` sums one over the ops, and
`marginal_cost` is its gradient; only a measured latency table is read directly, by interpolation
between its timed widths (its polynomial is the regularizer's linearization at full width).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_morph.costs.hardware import Hardware
from onnx_morph.costs.measured import LatencyTable
from onnx_morph.costs.polynomial import channel_classes
from onnx_morph.costs.terms import cost_terms
from onnx_morph.graph.channel_graph import ChannelGraph


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
    classes = channel_classes(graph, tensor, axis)
    if classes.size and classes.max() == graph.num_classes:  # `fixed`: always alive
        return np.append(alive, True)[classes]
    return alive[classes]


def op_costs(
    graph: ChannelGraph,
    alive: np.ndarray,
    *,
    macs: bool = False,
    hardware: Hardware | LatencyTable | None = None,
) -> list[OpCost]:
    """The cost of every non-static node, in graph order, under the given alive classes; latency is the
    roofline of `hardware`, or interpolated from a measured table (0 for ops it does not time)."""
    resources = {"flops": {"macs": macs}, "params": {}, "activations": {}, "memory": {}}
    if isinstance(hardware, Hardware):
        resources["latency"] = {"hardware": hardware}
    values = {resource: cost_terms(graph, resource, **options).per_node(alive)
              for resource, options in resources.items()}
    costs = []
    for name, relation in graph.relations.items():
        node = graph.nodes[name]
        (in_alive, in_total), (out_alive, out_total) = _widths(graph, alive, name)
        latency = values.get("latency", {}).get(name, 0.0)
        if isinstance(hardware, LatencyTable) and relation.geometry is not None:
            latency = hardware.op_latency(name, in_alive, out_alive)
        costs.append(OpCost(name, node.op_type, in_alive, in_total, out_alive, out_total,
                            round(values["flops"].get(name, 0)), values["params"].get(name, 0.0),
                            round(values["activations"].get(name, 0)), values["memory"].get(name, 0.0), latency))
    return costs


def _widths(graph: ChannelGraph, alive: np.ndarray, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(alive, total) channels of an op's input and output: along its geometry's axes, or of its first
    input and output's channel axes."""
    geometry = graph.relations[name].geometry
    if geometry is not None:
        return tuple((int(a.sum()), a.size) for a in (alive_along(graph, alive, geometry.input, geometry.in_axis),
                                                      alive_along(graph, alive, geometry.output, geometry.out_axis)))
    node = graph.nodes[name]
    return tuple(_channel_counts(graph, alive, tensors[0] if tensors else "") for tensors in (node.input, node.output))


def _channel_counts(graph: ChannelGraph, alive: np.ndarray, tensor: str) -> tuple[int, int]:
    classes = graph.classes(tensor)
    if classes is None:
        return 0, 0
    return int(alive[classes].sum()), int(classes.size)


def total_cost(graph: ChannelGraph, alive: np.ndarray, resource: str) -> float:
    """Total FLOPs (or parameters, activations) of the model under `alive`."""
    return float(sum(cost_terms(graph, resource).per_node(alive).values()))


def marginal_cost(graph: ChannelGraph, alive: np.ndarray, resource: str) -> np.ndarray:
    """Per class, how much FLOPs (or parameters, activations) removing it alone would save at the current
    alive set, to first order: the gradient of the cost polynomial."""
    return cost_terms(graph, resource).gradient(alive)
