"""The one place that maps ONNX op types to their handlers, and where users add their own."""

from __future__ import annotations

from onnx_morph.handlers.base import BaseHandler, Unknown, without_gradient
from onnx_morph.handlers.conv import Conv, ConvTranspose
from onnx_morph.handlers.elementwise import Elementwise, Sum
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
from onnx_morph.handlers.values import RANDOM, CastLike, Constant, Random, SequenceAt, ShapeOnly


# onnxruntime-training 1.19.2 has no gradient builder for these; the hint says what to export instead.
NO_GRADIENT = {
    "PRelu": "use nn.ReLU or nn.LeakyReLU",
    "HardSigmoid": "use nn.Sigmoid",
    "HardSwish": "use nn.SiLU (x * sigmoid(x))",
    "Softplus": "use nn.ReLU or nn.SiLU",
    "Elu": "use nn.ReLU or nn.LeakyReLU",
    "Einsum": "write the contraction with torch.matmul",
}
UNARY = (
    "Abs Acos Acosh Asin Asinh Atan Atanh BitwiseNot Ceil Celu Clip Cos Cosh Dropout Elu Erf Exp "
    "Floor Gelu HardSigmoid HardSwish IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal Relu Round "
    "Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Tan Tanh ThresholdedRelu"
).split()
SPATIAL = "AveragePool GlobalAveragePool GlobalLpPool GlobalMaxPool LpPool MaxPool Resize Upsample".split()
BINARY = (
    "Add And BitwiseAnd BitwiseOr BitwiseXor Div Equal Greater GreaterOrEqual Less LessOrEqual Max Mean Min Mod "
    "Mul Or Pow PRelu Sub Where Xor"
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
    "CastLike": CastLike(),
    "Sum": Sum(),
    "Constant": Constant(),
    "SequenceAt": SequenceAt(),
    **{op: Random() for op in RANDOM},
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
_REGISTRY.update({op: without_gradient(_REGISTRY.get(op, Unknown()), hint) for op, hint in NO_GRADIENT.items()})
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
    (`relate`), and, where it has parameters or shape constants, how surgery resizes them (`prune`);
    training asks it too (`no_gradient`, `to_training`, `to_eval`: see BaseHandler). Subclass
    BaseHandler, whose other hooks default to "nothing to do". Replaces a built-in handler of the same
    op; None removes the registration. Returns the handler that was registered before, if any, so
    that it can be restored."""
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
    """Whether a handler states the op's relation (the pinning one does not)."""
    return not isinstance(handler_for(op_type, domain), Unknown)


__all__ = ["handler_for", "is_known", "register_handler"]
