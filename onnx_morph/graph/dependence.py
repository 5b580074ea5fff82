"""Which channel elements of each activation can change with the model's inputs, and which values
are valid for its integer inputs: what verification needs to know before it runs the model."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnx_morph.graph.channel_graph import ChannelGraph, node_view
from onnx_morph.handlers import handler_for


def input_dependence(graph: ChannelGraph) -> dict[str, np.ndarray]:
    """Per activation tensor, per channel element (one entry for a tensor without channel axes),
    whether it may change with the model's inputs. False is a proof that the element is computed
    from constants only (a BatchNorm channel with scale 0 holds its shift, then relu(shift)), so
    one run tells its value; True is only "not proven", and the element may still be constant."""
    def size(name: str) -> int:
        info = graph.tensors.get(name)
        return info.channels if info is not None and info.channels else 1

    varying = {name: np.ones(size(name), dtype=bool) for name in graph.model.input_shapes}
    for name in graph.order:
        relation = graph.relations.get(name)
        if relation is None:  # computed from constants only (shape arithmetic)
            continue
        node = graph.nodes[name]
        view = node_view(graph, name)
        view = replace(view, outputs=[graph.tensors.get(o.name, o) if o is not None else None for o in view.outputs])
        inputs = [None if t is None or t.constant else varying.get(t.name, np.ones(size(t.name), dtype=bool))
                  for t in view.inputs]
        outputs = handler_for(node.op_type, node.domain).varying(view, relation, inputs)
        for tensor, value in zip(view.outputs, outputs):
            if tensor is not None:
                varying[tensor.name] = np.broadcast_to(np.asarray(value, dtype=bool), (size(tensor.name),)).copy()
    return varying


@dataclass(frozen=True)
class IndexRange:
    """Valid values of an integer input: [0, high). `evidence` names the table that bounds it, None
    when nothing in the model does (then 0/1, valid for masks and flags)."""

    high: int
    evidence: str | None


def integer_input_ranges(graph: ChannelGraph) -> dict[str, IndexRange]:
    """For each integer or boolean graph input, the values random inputs may take. An input read as
    indices into a table (an embedding lookup, directly or through casts and reshapes) takes
    [0, length of the shortest such table); any other integer input takes 0 or 1."""
    consumers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name in graph.order:
        for index, tensor in enumerate(graph.nodes[name].input):
            if tensor:
                consumers[tensor].append((name, index))
    ranges = {}
    for name in graph.model.input_shapes:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.model.dtypes.get(name, onnx.TensorProto.FLOAT))
        if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
            continue
        bounds = _index_bounds(graph, consumers, name) if np.issubdtype(dtype, np.integer) else []
        if dtype == np.bool_:
            ranges[name] = IndexRange(2, "boolean")
        elif bounds:
            high, node = min(bounds)
            ranges[name] = IndexRange(max(high, 1), f"{graph.nodes[node].op_type} node '{node}' reads it as indices "
                                                     f"into a table of {high}")
        else:
            ranges[name] = IndexRange(2, None)
    return ranges


def _index_bounds(graph: ChannelGraph, consumers, name: str) -> list[tuple[int, str]]:
    """(table length, node) for every node that reads `name`'s values as indices."""
    bounds, frontier, seen = [], [name], {name}
    while frontier:
        tensor = frontier.pop()
        for node_name, index in consumers.get(tensor, []):
            node = graph.nodes[node_name]
            handler = handler_for(node.op_type, node.domain)
            bound = handler.index_bound(node_view(graph, node_name), index)
            if bound is not None:
                bounds.append((bound, node_name))
            elif handler.preserves_values and index == 0:
                fresh = [o for o in node.output[:1] if o and o not in seen]
                seen.update(fresh)
                frontier.extend(fresh)
    return bounds
