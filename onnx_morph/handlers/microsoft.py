"""onnxruntime's contrib ops (domain com.microsoft), as its graph optimizations and transformer
optimizer write them: fused convs, matmuls and gemms prune like the standard op they fuse; bias +
GELU activations are per-feature elementwise; the skip/simplified layer norms normalize the feature
stream like LayerNormalization; the fused attention kernels hide their heads in one weight or in
packed inputs and are pinned with the op named. onnx's shape inference does not know these ops,
so each handler also gives its output shapes."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnx_morph.handlers.base import (BaseHandler, NodeView, OpGeometry, ParamTerm, Pin, Relation, Source,
                                      TensorInfo, describe, identity_tie, pin_all, varying_through_weight)
from onnx_morph.handlers.conv import Conv
from onnx_morph.handlers.elementwise import Elementwise
from onnx_morph.handlers.linear import Gemm, MatMul
from onnx_morph.handlers.norm import LayerNorm
from onnx_morph.handlers.passthrough import Passthrough

Shape = tuple[int, ...]
# Attributes the fused ops add to the standard op they fuse.
_FUSION_ATTRS = {"activation", "activation_params", "activationAlpha", "activationBeta", "activationGamma"}


def standard_output_shapes(node: onnx.NodeProto, op_type: str, inputs: list[Shape | None]) -> list | None:
    """Output shapes of the standard op `op_type` a fused node computes before its activation, from
    onnx's own shape inference on that op alone."""
    if any(s is None for s in inputs) or not inputs:
        return None
    names = [f"in{i}" for i in range(len(inputs))]
    attrs = [a for a in node.attribute if a.name not in _FUSION_ATTRS]
    standard = onnx.helper.make_node(op_type, names, ["out"])
    standard.attribute.extend(attrs)
    graph = onnx.helper.make_graph(
        [standard], "fused", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(s))
                              for n, s in zip(names, inputs)],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    try:
        inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph), strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return None
    out = inferred.graph.output[0].type.tensor_type
    if not out.HasField("shape") or any(not d.HasField("dim_value") for d in out.shape.dim):
        return None
    return [tuple(d.dim_value for d in out.shape.dim)]


class FusedConv(Conv):
    """Conv + bias + activation: channels as Conv's. With a Z input (a shortcut summed before the
    activation, which onnxruntime writes only at its NCHWc level) everything is pinned: onnxruntime
    1.19 computes such chains differently with and without its NCHWc layout, so no pruned model of
    them could be verified."""

    def relate(self, view: NodeView) -> Relation:
        relation = super().relate(view)
        z = view.input(3)
        if z is not None and not z.constant:
            reason = (f"{describe(view)} (com.microsoft) adds a Z input, which onnxruntime computes differently "
                      f"by optimization level")
            relation.pins += pin_all(view, reason)
        return relation

    def output_shapes(self, node: onnx.NodeProto, inputs: list[Shape | None]) -> list | None:
        return standard_output_shapes(node, "Conv", inputs[:3])


class FusedGemm(Gemm):
    """Gemm + activation."""

    def output_shapes(self, node: onnx.NodeProto, inputs: list[Shape | None]) -> list | None:
        return standard_output_shapes(node, "Gemm", inputs[:3])


def _swap_last(info: TensorInfo | None) -> TensorInfo | None:
    """The operand transposed on its last two axes, as FusedMatMul's transA/transB read it: the same
    channel elements in the same order, on the swapped axes."""
    if info is None or info.shape is None or len(info.shape) < 2:
        return info
    rank = len(info.shape)
    swap = {rank - 1: rank - 2, rank - 2: rank - 1}
    shape = (*info.shape[:-2], info.shape[-1], info.shape[-2])
    axes = None if info.axes is None else tuple(swap.get(a, a) for a in info.axes)
    return TensorInfo(info.name, shape, axes, info.constant, info.computed, info.sliceable)


class FusedMatMul(MatMul):
    """Y = alpha * A' B' (A' = A^T with transA, B' = B^T with transB on the last two axes): a constant
    B' is a weight [in, out] stored as [out, in] with transB; between activations, the product of the
    transposed operands (attention scores with the 1/sqrt(d) scale folded into alpha)."""

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return ((rank - 2,) if view.attr("transA", 0) else (rank - 1,)) if index == 0 else None

    def relate(self, view: NodeView) -> Relation:
        if view.attr("transBatchA", 0) or view.attr("transBatchB", 0):
            return Relation([None], pins=pin_all(view, f"{describe(view)} (com.microsoft) transposes batch axes"))
        a, b = view.input(0), view.input(1)
        if b is not None and b.constant and view.attr("transA", 0):
            return Relation([None], pins=pin_all(view, f"{describe(view)} (com.microsoft) reads a transposed input"))
        transposed = NodeView(view.node, view.name, [_swap_last(a) if view.attr("transA", 0) else a,
                                                     _swap_last(b) if view.attr("transB", 0) else b],
                              view.outputs, view.constant_of, view.opset)
        relation = super().relate(transposed)
        if b is not None and b.constant and view.attr("transB", 0):
            relation.sources = [Source(s.kind, s.tensor, s.node, s.param, axis=0) for s in relation.sources]
        return relation

    def varying(self, view: NodeView, relation: Relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
        b = view.const(1)
        if relation.pins or b is None or b.ndim != 2 or view.attr("transA", 0):
            return BaseHandler.varying(self, view, relation, inputs)
        result = varying_through_weight(inputs, (b if view.attr("transB", 0) else b.T) != 0)
        return BaseHandler.varying(self, view, relation, inputs) if result is None else result

    def prune(self, view: NodeView, edit) -> None:
        a, b, y = view.input(0), view.input(1), view.outputs[0]
        if not b.constant or b.shape is None or len(b.shape) != 2:
            return
        in_axis, out_axis = (1, 0) if view.attr("transB", 0) else (0, 1)
        keep_in, keep_out = edit.keep(a.name), edit.keep(y.name)
        if keep_in is not None:
            edit.slice_input(1, in_axis, keep_in)
        if keep_out is not None:
            edit.slice_input(1, out_axis, keep_out)

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        return {} if view.attr("transB", 0) else super().initial_values(view, rng)

    def output_shapes(self, node: onnx.NodeProto, inputs: list[Shape | None]) -> list | None:
        view = NodeView(node, node.name, [], [], lambda _: None, 0)
        if len(inputs) < 2 or any(s is None or len(s) < 2 for s in inputs[:2]) or view.attr("transBatchA", 0) \
                or view.attr("transBatchB", 0):
            return None
        a, b = (_swap_last(TensorInfo("", tuple(s))).shape if view.attr(t, 0) else tuple(s)
                for s, t in zip(inputs[:2], ("transA", "transB")))
        try:
            batch = np.broadcast_shapes(a[:-2], b[:-2])
        except ValueError:
            return None
        return [(*batch, a[-2], b[-1])]


class BiasActivation(Elementwise):
    """BiasGelu and FastGelu (whose bias is optional): act(X + bias)
    per feature, the bias a per-feature parameter sliced with its channels."""

    def output_shapes(self, node: onnx.NodeProto, inputs: list[Shape | None]) -> list | None:
        return [inputs[0]] if inputs and inputs[0] is not None else None


class SkipLayerNorm(BaseHandler):
    """LayerNorm(input + skip + bias) over the last axis, outputs (Y, mean, inv_std_var,
    input_skip_bias_sum): the sum and Y carry the input's channels, all pinned as LayerNormalization's."""

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return (rank - 1,) if index in (0, 1) else None

    def relate(self, view: NodeView) -> Relation:
        x = view.input(0)
        if x is None or x.axes is None or x.shape is None:
            return Relation([None] * len(view.outputs),
                            pins=pin_all(view, f"{describe(view)} has an input of unknown layout"))
        streams = [y if index in (0, 3) else None for index, y in enumerate(view.outputs)]  # Y and the sum
        relation = Relation([x.axes if y is not None else None for y in streams],
                            pins=[Pin(x.name, f"{describe(view)} (com.microsoft) normalizes over these channels")])
        for t in (view.input(1), *streams):
            if t is None or t.constant:
                continue
            if t.shape != x.shape or t.axes not in (None, x.axes):
                relation.pins.append(Pin(t.name, f"{describe(view)} adds a skip of another layout than its input"))
            else:
                relation.ties.append(identity_tie(x, TensorInfo(t.name, t.shape, x.axes)))
        relation.params = [ParamTerm(t.name, math.prod(t.shape)) for t in view.inputs[1:]
                           if t is not None and t.constant and t.shape is not None]
        return relation

    def output_shapes(self, node: onnx.NodeProto, inputs: list[Shape | None]) -> list | None:
        x = inputs[0] if inputs else None
        if x is None:
            return None
        stats = (*x[:-1], 1)
        return [x, stats, stats, x][:len(node.output)]


class SimplifiedLayerNorm(LayerNorm):
    """RMSNorm as one op (SimplifiedLayerNormalization, X * scale / rms over axes [axis, rank))."""

    to_training = BaseHandler.to_training

    def output_shapes(self, node: onnx.NodeProto, inputs: list[Shape | None]) -> list | None:
        return [inputs[0]] if inputs and inputs[0] is not None else None


class FusedAttention(BaseHandler):
    """Attention, MultiHeadAttention, GroupQueryAttention, RotaryEmbedding: the heads live inside the
    kernel (one packed QKV weight, packed or cached inputs, num_heads attributes that surgery would
    have to rewrite consistently): every tensor they touch is pinned, with the op named."""

    def relate(self, view: NodeView) -> Relation:
        axes = [(t.rank - 1,) if t is not None and t.rank else None for t in view.outputs]
        reason = (f"{describe(view)} (com.microsoft) is a fused attention kernel whose heads onnx-morph does "
                  f"not prune; export without the transformer optimizer to prune heads")
        relation = Relation(axes, pins=pin_all(view, reason))
        x, weight, y = view.input(0), view.input(1), view.outputs[0]
        if view.op_type == "Attention" and _shaped(x, 3) and _shaped(weight, 2) and weight.constant and _shaped(y, 3):
            # The packed Q, K, V projection: kernel 3 counts its three output blocks per output feature.
            relation.geometry = OpGeometry(x.name, 2, y.name, 2, kernel=weight.shape[1] // y.shape[2],
                                           positions=x.shape[0] * x.shape[1], weight=weight.name)
            bias = view.input(2)
            if bias is not None and bias.constant and bias.shape is not None:
                relation.params.append(ParamTerm(bias.name, math.prod(bias.shape)))
        return relation

    def varying(self, view: NodeView, relation: Relation, inputs) -> list[bool]:
        return [any(bool(v.any()) for v in inputs if v is not None)] * len(view.outputs)

    def output_shapes(self, node: onnx.NodeProto, inputs: list[Shape | None]) -> list | None:
        x = inputs[0] if inputs else None
        if x is None or len(x) != 3:
            return None if node.op_type != "RotaryEmbedding" or x is None else [x]
        view = NodeView(node, node.name, [], [], lambda _: None, 0)
        return [(*x[:2], _attention_width(view, x, inputs))]


def _shaped(info: TensorInfo | None, rank: int) -> bool:
    return info is not None and info.shape is not None and len(info.shape) == rank


def _attention_width(view: NodeView, x: Shape, inputs: list[Shape | None]) -> int:
    """Output 0's hidden size: V's width (Attention: the packed weight's third, or qkv_hidden_sizes)."""
    op = view.op_type
    if op == "Attention":
        sizes = view.attr("qkv_hidden_sizes")
        weight = inputs[1] if len(inputs) > 1 else None
        return int(sizes[2]) if sizes else (weight[-1] // 3 if weight is not None else x[-1])
    if op == "GroupQueryAttention":
        heads, kv_heads = int(view.attr("num_heads", 1)), int(view.attr("kv_num_heads", 1))
        packed = len(inputs) < 2 or inputs[1] is None
        return heads * x[-1] // (heads + 2 * kv_heads) if packed else x[-1]
    if op == "MultiHeadAttention":
        value = inputs[2] if len(inputs) > 2 else None
        return value[-1] if value is not None and len(value) == 3 else x[-1]
    return x[-1]


MICROSOFT = {
    "FusedConv": FusedConv(),
    "FusedGemm": FusedGemm(),
    "FusedMatMul": FusedMatMul(),
    "BiasGelu": BiasActivation(),
    "FastGelu": BiasActivation(),
    "Gelu": Passthrough(),
    "QuickGelu": Passthrough(),
    "SkipLayerNormalization": SkipLayerNorm(),
    "SkipSimplifiedLayerNormalization": SkipLayerNorm(),
    "SimplifiedLayerNormalization": SimplifiedLayerNorm(),
    **{op: FusedAttention() for op in ("Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding")},
}
