"""Ops the loader evaluates or rewrites rather than relates: constants, shapes, types, random draws,
and torch's split-into-a-sequence idiom.

torch's dynamo exporter without its optimizer (the way to keep BatchNorm) writes `torch.split` and
`chunk` as SplitToSequence followed by SequenceAt with a constant index. Each such SequenceAt is
exactly a Slice of the split tensor along the split axis; the sequence goes once nothing reads it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_morph.handlers.base import BaseHandler, NodeView, Relation, Replacement, Unknown
from onnx_morph.handlers.passthrough import Passthrough

RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


class ShapeOnly(BaseHandler):
    """Shape and Size read only the static shape: their outputs are not activations."""

    static_output = True
    reads_shape = True

    def relate(self, view: NodeView) -> Relation:
        return Relation([None] * len(view.outputs))

    def fold(self, node, values, shapes, dtypes) -> list[np.ndarray] | None:
        shape = shapes[0] if shapes else None
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return [np.array(shape[start:end], dtype=np.int64)]


class Constant(BaseHandler):
    """A value held in the node's attributes: a constant, never an activation."""

    static_output = True

    def relate(self, view: NodeView) -> Relation:
        return Relation([None] * len(view.outputs))

    def constant_output(self, node: onnx.NodeProto) -> np.ndarray | None:
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                return np.array(helper.get_attribute_value(attr))
        return None

    def fold(self, node, values, shapes, dtypes) -> list[np.ndarray] | None:
        value = self.constant_output(node)
        return None if value is None else [value]


class CastLike(Passthrough):
    """Only the type of the second input matters: a constant cast like an activation is a constant."""

    def fold(self, node, values, shapes, dtypes) -> list[np.ndarray] | None:
        if len(values) < 2 or values[0] is None or dtypes[1] is None:
            return None
        return [values[0].astype(helper.tensor_dtype_to_np_dtype(dtypes[1]))]


class Random(Unknown):
    """Random draws: pinned like any unknown op, and never folded into constants."""

    foldable = False


class SequenceAt(Unknown):
    """A sequence's element: pinned, unless it reads a SplitToSequence at a constant index, which the
    loader rewrites into a Slice of the split tensor (see the module's docstring)."""

    def normalize(self, node: onnx.NodeProto, producer: Callable[[str], onnx.NodeProto | None],
                  constant: Callable[[str], np.ndarray | None]) -> Replacement | None:
        split = producer(node.input[0]) if node.input else None
        if split is None or split.op_type != "SplitToSequence" or split.domain not in ("", "ai.onnx"):
            return None
        bounds = _bounds(split, node, constant)
        if bounds is None:
            return None
        names = [f"{node.output[0]}/slice_{part}" for part in ("starts", "ends", "axes")]
        added = [numpy_helper.from_array(np.array([v], dtype=np.int64), name) for v, name in zip(bounds, names)]
        return Replacement([helper.make_node("Slice", [split.input[0], *names], list(node.output),
                                             name=node.name or f"{node.output[0]}/slice")], added)


def _bounds(split: onnx.NodeProto, at: onnx.NodeProto, constant) -> tuple[int, int, int] | None:
    """(start, end, axis) of the piece SequenceAt `at` takes from SplitToSequence `split`, when the
    split sizes (which keep the axis; keepdims only applies without them) and the index are constants."""
    axis = next((int(helper.get_attribute_value(a)) for a in split.attribute if a.name == "axis"), 0)
    sizes = constant(split.input[1]) if len(split.input) > 1 and split.input[1] else None
    index = constant(at.input[1]) if len(at.input) > 1 else None
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
