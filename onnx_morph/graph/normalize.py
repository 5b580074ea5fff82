"""Exporter idioms rewritten into the ops the handlers know, before anything else reads the model.

Each node's handler says whether it rewrites it (BaseHandler.normalize: torch's SplitToSequence ->
SequenceAt pairs become Slices); a node that fed a rewritten one goes once nothing reads it. This
runs first in loading, on the file as read: the handlers need only the node and constants here,
not shapes, which inference computes afterwards on the normalized graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.handlers import Replacement, handler_for


def normalized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy with the idioms rewritten (the input is never modified)."""
    replacements = _replacements(model.graph)
    if not replacements:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _apply(copy.graph, replacements)
    return copy


def _replacements(graph: onnx.GraphProto) -> dict[int, Replacement]:
    """By node index, the handlers' rewrites of the graph's nodes."""
    producers = {o: node for node in graph.node for o in node.output if o}
    initializers = {t.name: t for t in graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        return None if node is None else handler_for(node.op_type, node.domain).constant_output(node)

    found = {}
    for index, node in enumerate(graph.node):
        replacement = handler_for(node.op_type, node.domain).normalize(node, producers.get, constant)
        if replacement is not None:
            found[index] = replacement
    return found


def _apply(graph: onnx.GraphProto, replacements: dict[int, Replacement]) -> None:
    """Put the rewrites in place, and drop the nodes that fed a rewritten node and are read no more."""
    fed = {i for index in replacements for i in graph.node[index].input if i}
    nodes, added = [], []
    for index, node in enumerate(graph.node):
        replacement = replacements.get(index)
        nodes += [node] if replacement is None else replacement.nodes
        added += [] if replacement is None else replacement.initializers
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if not ({o for o in n.output if o} & fed and not set(n.output) & read)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
