"""Op handlers: the meaning of each ONNX op family for channels, costs and surgery."""

from onnx_morph.handlers.base import Grid, NodeView, OpGeometry, ParamTerm, Pin, Relation, Source, TensorInfo, Tie
from onnx_morph.handlers.registry import handler_for, is_known

__all__ = [
    "Grid", "NodeView", "OpGeometry", "ParamTerm", "Pin", "Relation", "Source", "TensorInfo", "Tie",
    "handler_for", "is_known",
]
