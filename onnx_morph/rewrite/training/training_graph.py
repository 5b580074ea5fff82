"""The regularizer as ONNX nodes, and the edits that make a model trainable in onnxruntime-training.

`add_regularizer` appends MorphNet's term (`expression`, emitted through `builder.Builder`) to an
inference model: two rank-0 outputs, the regularization value and the effective cost, computed
from the model's own initializers so that gradients reach the BatchNorm scales (or weights, or
gate logits). `add_gates` inserts the
probabilistic gates (a sampled logistic-sigmoid mask in training), and `deterministic_gates` turns
them into the eval graph's 0/1 mask (logit > 0). `trainable` prepares a model for the gradient
builder, asking each node's handler (BaseHandler.to_training, to_eval, no_gradient): BatchNorm in
training mode, LayerNorm with all outputs, Sum as Add chains, and a clear refusal of ops
onnxruntime-training cannot differentiate.
"""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_morph.errors import OptionError
from onnx_morph.handlers import handler_for
from onnx_morph.rewrite.editing import Names, drop_unused
from onnx_morph.rewrite.training.builder import PREFIX, Builder
from onnx_morph.rewrite.training.expression import open_gate_mask, regularization_term, sampled_gate_mask
from onnx_morph.rewrite.training.regularizer import Gate, Regularizer

REGULARIZATION = "morph_regularization"
EFFECTIVE_COST = "morph_effective_cost"
MIN_TRAINING_OPSET = 15


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
    builder = Builder(model.graph, _opset(model), "gates/")
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
        mask = sampled_gate_mask(builder, builder.gate_logits(gate), gate.channels, temperature, straight_through)
        builder.apply_gate(gate, ungated, mask)
        placements.append((producers[gate.tensor], start, False))
    _place(model.graph, placements)
    return model


def deterministic_gates(model: onnx.ModelProto, gates: tuple[Gate, ...] | list[Gate]) -> onnx.ModelProto:
    """In place: every gate of `add_gates` masks by (logit > 0); the sampling nodes go."""
    builder = Builder(model.graph, _opset(model), "eval_gates/")
    applied = {node.name: i for i, node in enumerate(model.graph.node)}
    placements = []
    for gate in gates:
        if f"{gate.param}/apply" not in applied:
            raise OptionError(f"the model has no gate '{gate.param}'")
        index = applied[f"{gate.param}/apply"]
        start = len(model.graph.node)
        mask = open_gate_mask(builder, builder.gate_logits(gate))
        model.graph.node[index].input[1] = builder.gate_shaped(gate, mask)
        placements.append((index, start, True))
    _place(model.graph, placements)
    drop_unused(model.graph, PREFIX)
    return model


def add_regularizer(model: onnx.ModelProto, regularizer: Regularizer) -> onnx.ModelProto:
    """A copy of `model` with REGULARIZATION and EFFECTIVE_COST as extra rank-0 outputs."""
    model = _copy(model)
    builder = Builder(model.graph, _opset(model))
    term = regularization_term(builder, regularizer, [source.param for source in regularizer.sources])
    builder.node("Identity", [term.cost], output=EFFECTIVE_COST)
    builder.node("Identity", [term.regularization], output=REGULARIZATION)
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in
                              (REGULARIZATION, EFFECTIVE_COST))
    return model


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
