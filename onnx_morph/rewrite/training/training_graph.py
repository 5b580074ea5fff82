"""The regularizer as ONNX nodes, and the edits that make a model trainable in onnxruntime-training.

`add_regularizer` appends MorphNet's term to an inference model: two rank-0 outputs, the
regularization value and the effective cost, computed from the model's own initializers so that
gradients reach the BatchNorm scales (or weights, or gate logits). `add_gates` inserts the
probabilistic gates (a sampled logistic-sigmoid mask in training), and `deterministic_gates` turns
them into the eval graph's 0/1 mask (logit > 0). `trainable` prepares a model for the gradient
builder, asking each node's handler (BaseHandler.to_training, to_eval, no_gradient): BatchNorm in
training mode, LayerNorm with all outputs, Sum as Add chains, and a clear refusal of ops
onnxruntime-training cannot differentiate.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_morph.costs.terms import COEFFICIENTS
from onnx_morph.errors import OptionError
from onnx_morph.handlers import handler_for
from onnx_morph.rewrite.editing import Names, drop_unused
from onnx_morph.rewrite.training.regularizer import RMS_EPSILON, Gate, Regularizer

REGULARIZATION = "morph_regularization"
EFFECTIVE_COST = "morph_effective_cost"
PREFIX = "morph/"
MIN_TRAINING_OPSET = 15
# Keeps the logistic noise log(u) - log(1 - u) finite.
NOISE_EPSILON = 1e-6
# Fixed-point step of the straight-through estimator's stop-gradient (a round trip through int32).
DETACH_SCALE = 2.0**24


def unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every use of a float initializer has its own tensor.

    Exporters merge equal-valued initializers (all BatchNorm scales of a fresh model are ones);
    trained as one tensor, those layers would be tied together.
    """
    model = _copy(model)
    floats = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    names = Names(model.graph)
    uses = Counter()
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name not in floats:
                continue
            uses[name] += 1
            if uses[name] > 1:
                copy = TensorProto()
                copy.CopyFrom(floats[name])
                copy.name = names.fresh(f"{name}__{uses[name] - 1}")
                model.graph.initializer.append(copy)
                node.input[index] = copy.name
    return model


def trainable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the gradient builder accepts: each node in its handler's training form (BatchNorm uses
    batch statistics and its running statistics stay frozen, LayerNorm declares all outputs, Sum
    becomes Add chains), and a clear refusal of ops onnxruntime-training cannot differentiate."""
    for node in model.graph.node:
        hint = handler_for(node.op_type, node.domain).no_gradient
        if hint is not None:
            raise OptionError(f"node '{node.name}' ({node.op_type}) has no gradient in onnxruntime-training 1.19.2: "
                              f"{hint} before exporting")
    model = _copy(model)
    if _opset(model) < MIN_TRAINING_OPSET:
        model = onnx.version_converter.convert_version(model, MIN_TRAINING_OPSET)
    nodes = [new for node in model.graph.node
             for new in handler_for(node.op_type, node.domain).to_training(node, lambda name: f"{PREFIX}{name}")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def with_batch_size(model: onnx.ModelProto, batch_size: int) -> onnx.ModelProto:
    """Fix a dynamic first dimension of the graph's inputs and outputs to `batch_size`.

    onnxruntime-training 1.19.2 builds a broken gradient (a zero-sized broadcast, or a crash) for an
    activation that feeds both a residual Add and another op when the batch is symbolic.
    """
    del model.graph.value_info[:]
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch_size
    return model


def eval_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The eval graph of `trainable`'s nodes, in place: each in its handler's eval form (BatchNorm with
    one output, normalizing by its running statistics)."""
    nodes = [new for node in model.graph.node for new in handler_for(node.op_type, node.domain).to_eval(node)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def add_gates(model: onnx.ModelProto, gates: tuple[Gate, ...] | list[Gate], *, temperature: float,
              straight_through: bool = False) -> onnx.ModelProto:
    """A copy where each gate's tensor is multiplied by mask = sigmoid((logit + log u - log(1 - u)) / T),
    u ~ Uniform, with logit = `gate.logit_scale` * a new initializer (starting at GATE_LOGIT / scale).

    With `straight_through` the forward mask is (mask > 0.5) and the gradient the soft mask's.
    """
    model = _copy(model)
    builder = _Builder(model.graph, _opset(model), "gates/")
    producers = {t: i for i, node in enumerate(model.graph.node) for t in node.output}
    placements = []
    for gate in gates:
        if gate.tensor not in producers:
            raise OptionError(f"gate '{gate.param}': no node produces '{gate.tensor}'")
        model.graph.initializer.append(numpy_helper.from_array(gate.initial_parameter(), gate.param))
        ungated = f"{gate.param}/ungated"
        node = model.graph.node[producers[gate.tensor]]
        node.output[list(node.output).index(gate.tensor)] = ungated
        start = len(model.graph.node)
        u = builder.node("RandomUniform", [], dtype=TensorProto.FLOAT, shape=[gate.channels],
                         low=NOISE_EPSILON, high=1.0 - NOISE_EPSILON)
        odds = builder.node("Div", [u, builder.node("Sub", [builder.const("one", np.array(1.0)), u])])
        noisy = builder.node("Add", [builder.gate_logits(gate), builder.node("Log", [odds])])
        mask = builder.node("Sigmoid", [builder.scale(noisy, 1.0 / temperature)])
        if straight_through:
            hard = builder.node("Cast", [builder.node("Greater", [mask, builder.const("half", np.array(0.5))])],
                                to=TensorProto.FLOAT)
            mask = builder.node("Add", [hard, builder.node("Sub", [mask, builder.detached(mask)])])
        builder.apply_gate(gate, ungated, mask)
        placements.append((producers[gate.tensor], start, False))
    _place(model.graph, placements)
    return model


def deterministic_gates(model: onnx.ModelProto, gates: tuple[Gate, ...] | list[Gate]) -> onnx.ModelProto:
    """In place: every gate of `add_gates` masks by (logit > 0); the sampling nodes go."""
    builder = _Builder(model.graph, _opset(model), "eval_gates/")
    applied = {node.name: i for i, node in enumerate(model.graph.node)}
    placements = []
    for gate in gates:
        if f"{gate.param}/apply" not in applied:
            raise OptionError(f"the model has no gate '{gate.param}'")
        index = applied[f"{gate.param}/apply"]
        start = len(model.graph.node)
        mask = builder.node("Cast", [builder.node("Greater", [builder.gate_logits(gate),
                                                              builder.const("zero", np.array(0.0))])],
                            to=TensorProto.FLOAT)
        model.graph.node[index].input[1] = builder.node(
            "Reshape", [mask, builder.const("shape", gate.shape, np.int64)])
        placements.append((index, start, True))
    _place(model.graph, placements)
    drop_unused(model.graph, PREFIX)
    return model


def add_regularizer(model: onnx.ModelProto, regularizer: Regularizer) -> onnx.ModelProto:
    """A copy of `model` with REGULARIZATION and EFFECTIVE_COST as extra rank-0 outputs."""
    model = _copy(model)
    builder = _Builder(model.graph, _opset(model))
    vectors = [builder.source_vector(regularizer, source) for source in regularizer.sources]
    values = builder.node("Concat", [*vectors, builder.const("zero", np.zeros(1))], axis=0)
    gathered = [builder.node("Gather", [values, builder.const("gather", row, np.int64)], axis=0)
                for row in regularizer.gather]
    if regularizer.kind == "gates":
        one = builder.const("one", np.array(1.0))
        closed = builder.node("Sub", [one, gathered[0]])
        for row in gathered[1:]:
            closed = builder.node("Mul", [closed, builder.node("Sub", [one, row])])
        r = builder.node("Sub", [one, closed])
    else:
        r = gathered[0] if len(gathered) == 1 else builder.node("Max", gathered)
    compare = "GreaterOrEqual" if regularizer.kind == "gates" else "Greater"
    above = builder.node(compare, [r, builder.const("threshold", np.array(regularizer.threshold))])
    alive = builder.node("Cast", [builder.node("Or", [above, builder.const("fixed", regularizer.fixed, np.bool_)])],
                         to=TensorProto.FLOAT)
    terms = regularizer.terms
    # vector @ counts^T, not counts @ vector: onnxruntime-training 1.19.2 builds a wrong gradient
    # for MatMul(matrix, 1-D vector).
    counts = {side: builder.const(f"counts_{side}", terms.counts(side).T) for side in ("in", "out")}
    a_in, a_out = (builder.node("MatMul", [alive, counts[s]]) for s in ("in", "out"))
    r_in, r_out = (builder.node("MatMul", [r, counts[s]]) for s in ("in", "out"))
    coefficient = {name: terms.coefficients(name) for name in COEFFICIENTS}
    cost = builder.polynomial([
        ("bilinear", [a_in, a_out]), ("in_linear", [a_in]), ("out_linear", [a_out]), ("constant", [])], coefficient)
    cross = builder.node("Add", [builder.node("Mul", [a_in, r_out]), builder.node("Mul", [a_out, r_in])])
    reg = builder.polynomial([
        ("bilinear", [cross]), ("in_linear", [r_in]), ("out_linear", [r_out]), ("depthwise", [r_in])], coefficient)
    if terms.parts == 1:
        total_cost, total_reg = builder.reduce_all(cost), builder.reduce_all(reg)
    else:
        total_cost, total_reg = builder.roofline(cost, reg, terms.row_nodes())
    builder.node("Identity", [total_cost], output=EFFECTIVE_COST)
    builder.node("Identity", [total_reg], output=REGULARIZATION)
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in
                              (REGULARIZATION, EFFECTIVE_COST))
    return model


class _Builder:
    """Appends nodes and constant initializers under the `morph/` prefix."""

    def __init__(self, graph: onnx.GraphProto, opset: int, tag: str = ""):
        self.graph, self.opset, self.count, self.tag = graph, opset, 0, tag

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{PREFIX}{self.tag}{hint}_{self.count}"

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

    def reduce_all(self, x: str) -> str:
        return self.reduce("ReduceSum", x, None)

    def detached(self, x: str) -> str:
        """x to within 1 / DETACH_SCALE, through an integer cast, which no gradient crosses."""
        fixed = self.node("Cast", [self.scale(x, DETACH_SCALE)], to=TensorProto.INT32)
        return self.scale(self.node("Cast", [fixed], to=TensorProto.FLOAT), 1.0 / DETACH_SCALE)

    def apply_gate(self, gate: Gate, ungated: str, mask: str) -> None:
        shaped = self.node("Reshape", [mask, self.const("shape", gate.shape, np.int64)])
        self.graph.node.append(helper.make_node("Mul", [ungated, shaped], [gate.tensor], name=f"{gate.param}/apply"))

    def gate_logits(self, gate: Gate) -> str:
        """`Gate.logits` in the graph: the stored parameter times the gate's logit scale."""
        return self.scale(gate.param, gate.logit_scale)

    def source_vector(self, regularizer: Regularizer, source) -> str:
        if regularizer.kind == "gates":
            return self.node("Sigmoid", [self.gate_logits(regularizer.gate(source.param))])
        if regularizer.kind == "gamma":
            return self.node("Abs", [self.node("Reshape", [source.param, self.const("shape", [-1], np.int64)])])
        x = source.param
        if source.axis != 0:
            rank = len(next(t.dims for t in self.graph.initializer if t.name == source.param))
            x = self.node("Transpose", [x], perm=[source.axis] + [a for a in range(rank) if a != source.axis])
        slices = self.node("Reshape", [x, self.const("shape", [source.channels, -1], np.int64)])
        square_mean = self.reduce("ReduceMean", self.node("Mul", [slices, slices]), [1])
        rms = self.node("Sqrt", [self.node("Add", [square_mean, self.const("epsilon", np.array(RMS_EPSILON))])])
        if regularizer.l1_fraction == 0:
            return rms
        l1 = self.reduce("ReduceMean", self.node("Abs", [slices]), [1])
        return self.node("Add", [self.scale(l1, regularizer.l1_fraction), self.scale(rms, 1 - regularizer.l1_fraction)])

    def scale(self, x: str, factor: float) -> str:
        return self.node("Mul", [x, self.const("factor", np.array(factor))])

    def polynomial(self, monomials: list[tuple[str, list[str]]], coefficient: dict[str, np.ndarray]) -> str:
        """sum of coefficient[name] * prod(factors), over the monomials whose coefficients are not all zero;
        the result has shape (parts, rows)."""
        terms = []
        for name, factors in monomials:
            values = coefficient[name]
            if not values.any():
                continue
            term = self.const(name, values)
            for factor in factors:
                term = self.node("Mul", [term, factor])
            terms.append(term)
        if not terms:
            return self.const("zeros", np.zeros_like(coefficient["bilinear"]))
        total = terms[0]
        for term in terms[1:]:
            total = self.node("Add", [total, term])
        return total

    def roofline(self, cost: str, reg: str, row_nodes: np.ndarray) -> tuple[str, str]:
        """Per op, the larger of compute and memory time, regularized through that one."""
        to_nodes = self.const("row_nodes", row_nodes.T)
        per_node = {}
        for label, x in (("cost", cost), ("reg", reg)):
            summed = self.node("MatMul", [x, to_nodes])
            per_node[label] = [self.node("Gather", [summed, self.const("part", np.array(p), np.int64)], axis=0)
                               for p in (0, 1)]
        compute_bound = self.node("Cast", [self.node("Not", [self.node("Less", per_node["cost"])])],
                                  to=TensorProto.FLOAT)
        memory_bound = self.node("Sub", [self.const("one", np.array(1.0)), compute_bound])

        def pick(compute: str, memory: str) -> str:
            return self.reduce_all(self.node("Add", [self.node("Mul", [compute, compute_bound]),
                                                     self.node("Mul", [memory, memory_bound])]))

        return pick(*per_node["cost"]), pick(*per_node["reg"])


def _place(graph: onnx.GraphProto, placements: list[tuple[int, int, bool]]) -> None:
    """Move the nodes appended from each `start` on (up to the next placement's) next to the node at
    `anchor`, before or after it, so the graph stays topologically sorted."""
    if not placements:
        return
    nodes = list(graph.node)
    ends = [start for _, start, _ in placements[1:]] + [len(nodes)]
    near: dict[tuple[int, bool], list] = {}
    for (anchor, start, before), end in zip(placements, ends):
        near.setdefault((anchor, before), []).extend(nodes[start:end])
    ordered = []
    for index, node in enumerate(nodes[:placements[0][1]]):
        ordered += near.get((index, True), []) + [node] + near.get((index, False), [])
    del graph.node[:]
    graph.node.extend(ordered)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
