"""Which trained parameters each op reads: the parameter count's coefficients.

Parameters count every float initializer that the computation on activations reads (weights,
biases, norm scales and shifts; not BatchNorm running statistics), directly at each use, or through
a constant subgraph (a gathered position table, an unsqueezed scale, a normalized weight) once per
computed tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_morph.costs.polynomial import CostTerms, Polynomial, channel_classes, split_rows
from onnx_morph.graph.channel_graph import ChannelGraph
from onnx_morph.handlers import OpGeometry, ParamTerm, handler_for


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
            per_pair = _weight_per_pair(graph, name, geometry, _trained_elements(graph, geometry.weight, counted))
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


def _weight_per_pair(graph: ChannelGraph, name: str, geometry: OpGeometry, elements: int) -> float:
    """Parameters per channel pair: the kernel for a weight initializer; a weight computed from several
    (weight norm's direction and gain) spreads them over the pairs, the value of the op's unit bilinear
    polynomial with every channel alive."""
    if not elements:
        return 0.0
    if graph.param_root(geometry.weight) is not None:
        return float(geometry.kernel)
    c_in = channel_classes(graph, geometry.input, geometry.in_axis)
    c_out = channel_classes(graph, geometry.output, geometry.out_axis)
    unit = CostTerms("pairs", split_rows(name, c_in, c_out, geometry.groups, Polynomial(bilinear=(1.0,))), graph.num_classes, 1)
    pairs = float(unit.node_costs(np.ones(graph.num_classes, dtype=bool)).sum())
    return elements / pairs if pairs else 0.0
