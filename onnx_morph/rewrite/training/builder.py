"""Appending ONNX nodes to a graph: the training rewrite's node builder and the ONNX backend of the
regularization term (`expression.Backend`, whose tensors are here tensor names)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_morph.rewrite.editing import Names
from onnx_morph.rewrite.training.regularizer import Gate

PREFIX = "morph/"
# Fixed-point step of the straight-through estimator's stop-gradient (a round trip through int32).
DETACH_SCALE = 2.0**24
_DTYPES = {"f": np.float32, "b": np.bool_, "i": np.int64, "u": np.int64}


class Builder:
    """Appends nodes and constant initializers under the `morph/` prefix (fresh names: `Names`)."""

    def __init__(self, graph: onnx.GraphProto, opset: int, tag: str = ""):
        self.graph, self.opset, self.tag = graph, opset, tag
        self.names = Names(graph)
        self.constants: dict[str, str] = {}
        self.masks: dict[str, tuple[str, str]] = {}

    def name(self, hint: str) -> str:
        return self.names.fresh(f"{PREFIX}{self.tag}{hint}")

    def const(self, hint: str, value: np.ndarray, dtype=np.float32) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        output = output or self.name(op.lower())
        self.graph.node.append(helper.make_node(op, inputs, [output], name=self.name(op), **attributes))
        return output

    def reduce(self, op: str, x: str, axes: list[int] | None, keepdims: int = 0) -> str:
        """A Reduce node in the model's opset (axes became an input in 13 for ReduceSum, 18 for the rest)."""
        if axes is None:
            return self.node(op, [x], keepdims=keepdims)
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.node(op, [x, self.const("axes", np.array(axes), np.int64)], keepdims=keepdims)
        return self.node(op, [x], axes=axes, keepdims=keepdims)

    def detached(self, x: str) -> str:
        """x to within 1 / DETACH_SCALE, through an integer cast, which no gradient crosses."""
        fixed = self.node("Cast", [self.scale(x, DETACH_SCALE)], to=TensorProto.INT32)
        return self.scale(self.node("Cast", [fixed], to=TensorProto.FLOAT), 1.0 / DETACH_SCALE)

    def apply_gate(self, gate: Gate, ungated: str, mask: str) -> None:
        self.graph.node.append(helper.make_node("Mul", [ungated, self.gate_shaped(gate, mask)], [gate.tensor],
                                                name=f"{gate.param}/apply"))

    def gate_shaped(self, gate: Gate, mask: str) -> str:
        """The per-channel `mask` shaped to broadcast over the gated tensor."""
        return self.node("Reshape", [mask, self.const("shape", gate.shape, np.int64)])

    def gate_logits(self, gate: Gate) -> str:
        """`Gate.logits` in the graph: the stored parameter times the gate's logit scale."""
        return self.scale(gate.param, gate.logit_scale)

    def scale(self, x: str, factor: float) -> str:
        return self.node("Mul", [x, self.const("factor", np.array(factor))])

    # The regularization term's backend (expression.Backend).

    def constant(self, key: str, value: np.ndarray) -> str:
        """One initializer per key and builder."""
        if key not in self.constants:
            value = np.asarray(value)
            self.constants[key] = self.const(key, value, _DTYPES[value.dtype.kind])
        return self.constants[key]

    def gather(self, x: str, key: str, index: np.ndarray) -> str:
        return self.node("Gather", [x, self.constant(key, np.asarray(index, dtype=np.int64))], axis=0)

    def row_sums(self, x: str, key: str, matrix: np.ndarray) -> str:
        # x @ matrix^T, not matrix @ x: onnxruntime-training 1.19.2 builds a wrong gradient for
        # MatMul(matrix, 1-D vector).
        return self.node("MatMul", [x, self.constant(f"{key}_T", matrix.T)])

    def add(self, x: str, y: str) -> str:
        return self.node("Add", [x, y])

    def sub(self, x: str, y: str) -> str:
        return self.node("Sub", [x, y])

    def mul(self, x: str, y: str) -> str:
        return self.node("Mul", [x, y])

    def abs(self, x: str) -> str:
        return self.node("Abs", [x])

    def sqrt(self, x: str) -> str:
        return self.node("Sqrt", [x])

    def sigmoid(self, x: str) -> str:
        return self.node("Sigmoid", [x])

    def flatten(self, x: str) -> str:
        return self.node("Reshape", [x, self.constant("flat", np.array([-1]))])

    def channel_slices(self, x: str, axis: int, channels: int) -> str:
        """Transpose `axis` first (x is an initializer), then one row per channel."""
        if axis != 0:
            rank = len(next(t.dims for t in self.graph.initializer if t.name == x))
            x = self.node("Transpose", [x], perm=[axis] + [a for a in range(rank) if a != axis])
        return self.node("Reshape", [x, self.constant(f"slices_{channels}", np.array([channels, -1]))])

    def mean_rows(self, x: str) -> str:
        return self.reduce("ReduceMean", x, [1])

    def concat(self, xs: list[str]) -> str:
        return self.node("Concat", xs, axis=0)

    def maximum(self, xs: list[str]) -> str:
        return xs[0] if len(xs) == 1 else self.node("Max", xs)

    def at_least(self, x: str, y: str, inclusive: bool) -> str:
        # Not(Less) rather than GreaterOrEqual: valid in every opset.
        return self.node("Not", [self.node("Less", [x, y])]) if inclusive else self.node("Greater", [x, y])

    def either(self, x: str, y: str) -> str:
        return self.node("Or", [x, y])

    def as_float(self, x: str) -> str:
        return self.node("Cast", [x], to=TensorProto.FLOAT)

    def select(self, condition: str, x: str, y: str) -> str:
        """x * c + y * (1 - c) with c = float(condition), once per condition."""
        if condition not in self.masks:
            chosen = self.as_float(condition)
            self.masks[condition] = (chosen, self.sub(self.constant("one", np.array(1.0)), chosen))
        chosen, other = self.masks[condition]
        return self.add(self.mul(x, chosen), self.mul(y, other))

    def total(self, x: str) -> str:
        return self.reduce("ReduceSum", x, None)

    def uniform(self, like: str, size: int, low: float, high: float) -> str:
        return self.node("RandomUniform", [], dtype=TensorProto.FLOAT, shape=[size], low=low, high=high)

    def log(self, x: str) -> str:
        return self.node("Log", [x])

    def div(self, x: str, y: str) -> str:
        return self.node("Div", [x, y])
