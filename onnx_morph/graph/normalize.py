"""Exporter idioms rewritten into the ops the handlers know, before anything else reads the model.

torch's dynamo exporter without its optimizer (the way to keep BatchNorm) writes `torch.split` and
`chunk` as SplitToSequence followed by SequenceAt with a constant index. Each such SequenceAt is
exactly a Slice of the split tensor along the split axis; the sequence goes once nothing reads it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def normalized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy with the idioms above rewritten (the input is never modified)."""
    graph = model.graph
    if not any(n.op_type == "SplitToSequence" and n.domain in ("", "ai.onnx") for n in graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _sequence_reads_as_slices(copy.graph)
    return copy


def _sequence_reads_as_slices(graph: onnx.GraphProto) -> None:
    constants = {t.name: t for t in graph.initializer}
    values = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
    splits = {n.output[0]: n for n in graph.node if n.op_type == "SplitToSequence" and n.domain in ("", "ai.onnx")}
    nodes, added = [], []
    for node in graph.node:
        split = splits.get(node.input[0]) if node.op_type == "SequenceAt" and node.input else None
        bounds = _bounds(split, node, constants, values) if split is not None else None
        if bounds is None:
            nodes.append(node)
            continue
        start, end, axis = bounds
        names = [f"{node.output[0]}/slice_{part}" for part in ("starts", "ends", "axes")]
        added += [numpy_helper.from_array(np.array([v], dtype=np.int64), name)
                  for v, name in zip((start, end, axis), names)]
        nodes.append(helper.make_node("Slice", [split.input[0], *names], list(node.output),
                                      name=node.name or f"{node.output[0]}/slice"))
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if not (n.op_type == "SplitToSequence" and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)


def _bounds(split: onnx.NodeProto, at: onnx.NodeProto, constants, values) -> tuple[int, int, int] | None:
    """(start, end, axis) of the piece SequenceAt `at` takes from SplitToSequence `split`, when the
    split sizes (which keep the axis; keepdims only applies without them) and the index are constants."""
    axis = next((int(helper.get_attribute_value(a)) for a in split.attribute if a.name == "axis"), 0)
    sizes = _constant(split.input[1], constants, values) if len(split.input) > 1 and split.input[1] else None
    index = _constant(at.input[1], constants, values)
    if sizes is None or index is None or index.size != 1 or int(index.reshape(-1)[0]) < 0:
        return None  # sizes from the shape (or a negative index) need the axis length: left as it is
    i = int(index.reshape(-1)[0])
    if sizes.ndim == 0:
        size = int(sizes)
        return i * size, (i + 1) * size, axis  # Slice clamps the last, shorter piece
    sizes = [int(s) for s in sizes.reshape(-1)]
    if i >= len(sizes):
        return None
    return sum(sizes[:i]), sum(sizes[:i + 1]), axis


def _constant(name: str, constants, values) -> np.ndarray | None:
    if name in constants:
        tensor = constants[name]
        return numpy_helper.to_array(tensor) if tensor.data_type in (TensorProto.INT64, TensorProto.INT32) else None
    node = values.get(name)
    if node is None:
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_int", "value_ints"):
            return np.array(helper.get_attribute_value(attr))
    return None
