"""Op handlers: the meaning of each ONNX op family for channels, costs and surgery."""

from onnx_morph.handlers.base import (
    BaseHandler, Grid, NodeView, OpGeometry, ParamTerm, Pin, Relation, Replacement, Source, TensorInfo, Tie,
    without_gradient,
)
from onnx_morph.handlers.elementwise import Elementwise
from onnx_morph.handlers.passthrough import Passthrough
from onnx_morph.handlers.registry import handler_for, is_known, register_handler

__all__ = [
    "BaseHandler", "Elementwise", "Grid", "NodeView", "OpGeometry", "ParamTerm", "Passthrough", "Pin", "Relation",
    "Replacement", "Source", "TensorInfo", "Tie", "handler_for", "is_known", "register_handler", "without_gradient",
]
