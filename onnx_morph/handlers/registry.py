"""The one place that maps ONNX op types to their handlers, and where users add their own."""

from __future__ import annotations

from onnx_morph.handlers.base import BaseHandler, NodeView, Relation, pin_all
from onnx_morph.handlers.conv import Conv, ConvTranspose
from onnx_morph.handlers.elementwise import Elementwise
from onnx_morph.handlers.layout import Concat, DepthToSpace, Expand, Gather, Reshape, Slice, Split, Tile, Transpose
from onnx_morph.handlers.linear import Gemm, MatMul
from onnx_morph.handlers.microsoft import MICROSOFT
from onnx_morph.handlers.norm import BatchNorm, GroupNorm, InstanceNorm, LayerNorm
from onnx_morph.handlers.quant import (
    ConvInteger, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, QGemm, QLinearAdd, QLinearConv, QLinearMatMul,
    QuantizeLinear,
)
from onnx_morph.handlers.passthrough import Cast, Identity, Pad, Passthrough, Reduce, Softmax, SpatialPassthrough
from onnx_morph.handlers.recurrent import Recurrent


class ShapeOnly(BaseHandler):
    """Shape and Size read only the static shape: their outputs are not activations."""

    static_output = True

    def relate(self, view: NodeView) -> Relation:
        return Relation([None] * len(view.outputs))


class Unknown(BaseHandler):
    """No handler knows this op: nothing it touches may shrink, and its outputs' layout is guessed
    as NCHW (axis 1) only so that the pin reaches the consumers' channels."""

    def relate(self, view: NodeView) -> Relation:
        axes = [(1,) if t is not None and t.rank is not None and t.rank >= 2 else None for t in view.outputs]
        reason = f"unknown op {view.op_type} at node '{view.name}'"
        if view.node.domain not in ("", "ai.onnx"):
            reason = f"unknown op {view.node.domain}.{view.op_type} at node '{view.name}'"
        return Relation(axes, pins=pin_all(view, reason))

    def varying(self, view: NodeView, relation: Relation, inputs) -> list[bool]:
        """An unknown op may draw random numbers: its outputs may change even on constant inputs."""
        return [True] * len(view.outputs)


UNARY = (
    "Abs Acos Acosh Asin Asinh Atan Atanh BitwiseNot CastLike Ceil Celu Clip Cos Cosh Dropout Elu Erf Exp "
    "Floor Gelu HardSigmoid HardSwish IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal Relu Round "
    "Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Tan Tanh ThresholdedRelu"
).split()
SPATIAL = "AveragePool GlobalAveragePool GlobalLpPool GlobalMaxPool LpPool MaxPool Resize Upsample".split()
BINARY = (
    "Add And BitwiseAnd BitwiseOr BitwiseXor Div Equal Greater GreaterOrEqual Less LessOrEqual Max Mean Min Mod "
    "Mul Or Pow PRelu Sub Sum Where Xor"
).split()
REDUCE = (
    "ArgMax ArgMin ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
    "ReduceSum ReduceSumSquare"
).split()

_REGISTRY: dict[str, BaseHandler] = {
    **{op: Passthrough() for op in UNARY},
    **{op: SpatialPassthrough() for op in SPATIAL},
    **{op: Elementwise() for op in BINARY},
    **{op: Reduce() for op in REDUCE},
    **{op: Softmax() for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: Reshape() for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")},
    **{op: ShapeOnly() for op in ("Shape", "Size")},
    "Identity": Identity(),
    "Cast": Cast(),
    "Conv": Conv(),
    "ConvTranspose": ConvTranspose(),
    "Gemm": Gemm(),
    "MatMul": MatMul(),
    "BatchNormalization": BatchNorm(),
    "InstanceNormalization": InstanceNorm(),
    "LayerNormalization": LayerNorm(),
    "GroupNormalization": GroupNorm(),
    "Pad": Pad(),
    "Transpose": Transpose(),
    "Concat": Concat(),
    "Split": Split(),
    "Slice": Slice(),
    "Gather": Gather(),
    "Expand": Expand(),
    "DepthToSpace": DepthToSpace(),
    "SpaceToDepth": DepthToSpace(),
    **{op: Recurrent() for op in ("LSTM", "GRU", "RNN")},
    "SimplifiedLayerNormalization": MICROSOFT["SimplifiedLayerNormalization"],  # onnxruntime's, in this domain
    "QuantizeLinear": QuantizeLinear(),
    "DequantizeLinear": DequantizeLinear(),
    "DynamicQuantizeLinear": DynamicQuantizeLinear(),
    "QLinearConv": QLinearConv(),
    "ConvInteger": ConvInteger(),
    "QLinearMatMul": QLinearMatMul(),
    "MatMulInteger": MatMulInteger(),
    "Tile": Tile(),
}
_UNKNOWN = Unknown()
# onnxruntime's contrib ops, as its graph optimizations, transformer optimizer and quantizer write them.
_DOMAINS: dict[str, dict[str, BaseHandler]] = {
    "": _REGISTRY,
    "com.microsoft": {**MICROSOFT, "QGemm": QGemm(), "QLinearAdd": QLinearAdd(), "QLinearMul": QLinearAdd()},
}


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def handler_for(op_type: str, domain: str = "") -> BaseHandler:
    """The handler for an op; ops no handler is registered for get the pinning one."""
    return _DOMAINS.get(_domain(domain), {}).get(op_type, _UNKNOWN)


def register_handler(op_type: str, handler: BaseHandler | None, domain: str = "") -> BaseHandler | None:
    """Teach onnx-morph an op (a custom op, or another domain's): `handler` states its channel relation
    (`relate`), and, where it has parameters or shape constants, how surgery resizes them (`prune`).
    Subclass BaseHandler, whose other hooks default to "nothing to do". Replaces a built-in handler of the same op; None removes the registration. Returns the handler
    that was registered before, if any, so that it can be restored."""
    if handler is not None and not isinstance(handler, BaseHandler):
        raise TypeError(f"a handler subclasses onnx_morph.handlers.BaseHandler (or Passthrough, Elementwise), "
                        f"and {type(handler).__name__} does not")
    table = _DOMAINS.setdefault(_domain(domain), {})
    previous = table.get(op_type)
    if handler is None:
        table.pop(op_type, None)
    else:
        table[op_type] = handler
    return previous


def is_known(op_type: str, domain: str = "") -> bool:
    return handler_for(op_type, domain) is not _UNKNOWN


__all__ = ["handler_for", "is_known", "register_handler"]
