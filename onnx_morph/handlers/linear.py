"""Gemm and MatMul: with a constant weight they create new feature channels; a MatMul of two
activations (attention) follows its operands element by element (handlers/products.py)."""

from __future__ import annotations

import math

import numpy as np

from onnx_morph.errors import ModelLoadError
from onnx_morph.handlers.base import (BaseHandler, NodeView, OpGeometry, ParamTerm, Pin, Relation, Source,
                                      TensorInfo, describe, fresh_weight_and_bias, param_dtype, uniform_init,
                                      varying_through_weight)
from onnx_morph.handlers.products import activation_product


def _last(rank: int) -> tuple[int, ...]:
    return (rank - 1,)


class Gemm(BaseHandler):
    """Y = A' B' + C with A' = A or A^T (transA), B' = B or B^T (transB)."""

    parameter_inputs = (1, 2)

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        if index == 0:
            return (0,) if view.attr("transA", 0) else (1,)
        return None

    def relate(self, view: NodeView) -> Relation:
        a, b, y = view.input(0), view.input(1), view.outputs[0]
        relation = Relation([(1,)])
        if a is None or a.shape is None or b is None or b.shape is None or y.shape is None or not b.constant:
            relation.pins = [Pin(t.name, f"{describe(view)} has a weight computed at run time")
                             for t in (a, y) if t is not None and t.is_activation]
            return relation
        feature_axis = 0 if view.attr("transA", 0) else 1
        trans_b = bool(view.attr("transB", 0))
        _check_gemm(view, a, b, y, feature_axis, trans_b)
        if a.axes != (feature_axis,):
            relation.pins.append(Pin(a.name, f"{describe(view)} reads features on axis {feature_axis}, the input's are on {a.axes}"))
        relation.sources.append(Source("weight", y.name, view.name, b.name, axis=0 if trans_b else 1))
        relation.geometry = OpGeometry(a.name, feature_axis, y.name, 1, kernel=1, positions=y.shape[0], weight=b.name)
        c = view.input(2)
        if c is not None and c.shape is not None:
            per_feature = len(c.shape) >= 1 and c.shape[-1] == y.shape[1] and math.prod(c.shape) == y.shape[1]
            relation.params.append(ParamTerm(c.name, math.prod(c.shape), y.name if per_feature else None))
        return relation


    def varying(self, view: NodeView, relation: Relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
        a, y, b = view.input(0), view.outputs[0], view.const(1)
        if relation.pins or b is None or view.attr("transA", 0) or a.axes != (1,) or y.axes != (1,):
            return super().varying(view, relation, inputs)
        result = varying_through_weight(inputs, (b if view.attr("transB", 0) else b.T) != 0)
        return super().varying(view, relation, inputs) if result is None else result

    def prune(self, view: NodeView, edit) -> None:
        a, y = view.input(0), view.outputs[0]
        keep_in, keep_out = edit.keep(a.name), edit.keep(y.name)
        in_axis, out_axis = (1, 0) if view.attr("transB", 0) else (0, 1)
        c = view.input(2)
        per_feature = c is None or (c.shape is not None and len(c.shape) >= 1 and math.prod(c.shape) == y.shape[1])
        if keep_in is not None and per_feature and not view.attr("transA", 0):
            removed = edit.removed_values(a.name)
            if removed is not None:
                # A removed feature holding the constant v adds v * alpha * B[v, :] to every row.
                b = view.const(1)
                weight = b.T if view.attr("transB", 0) else b
                delta = float(view.attr("alpha", 1.0)) * (removed.astype(b.dtype) @ weight)
                bias = np.zeros(y.shape[1], dtype=b.dtype) if c is None else view.const(2).reshape(-1)
                bias = bias * float(view.attr("beta", 1.0))
                edit.set_input(2, (bias + delta).astype(b.dtype))
                edit.set_attr("beta", None)
                edit.folded(a.name)
                c = TensorInfo("bias", (y.shape[1],), constant=True)
        if keep_in is not None:
            edit.slice_input(1, in_axis, keep_in)
        if keep_out is not None:
            edit.slice_input(1, out_axis, keep_out)
            if c is not None and c.shape and c.shape[-1] == keep_out.size:
                edit.slice_input(2, len(c.shape) - 1, keep_out)


    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        b = view.input(1)
        if b is None or not b.constant or b.shape is None or len(b.shape) != 2:
            return {}
        return fresh_weight_and_bias(view, b.shape[1 if view.attr("transB", 0) else 0], rng)


def _check_gemm(view: NodeView, a: TensorInfo, b: TensorInfo, y: TensorInfo, feature_axis: int, trans_b: bool) -> None:
    """ModelLoadError when the weight or bias contradicts the input (onnx's shape inference does not check)."""
    problem = None
    if len(a.shape) != 2 or len(b.shape) != 2 or len(y.shape) != 2:
        problem = f"multiplies shapes {list(a.shape)} and {list(b.shape)}, Gemm takes matrices"
    elif a.shape[feature_axis] != b.shape[1 if trans_b else 0]:
        problem = f"multiplies {a.shape[feature_axis]} input features by a weight of shape {list(b.shape)}"
    else:
        c = view.input(2)
        if c is not None and c.shape is not None and (
            len(c.shape) > 2 or any(d not in (1, full) for d, full in zip(reversed(c.shape), reversed(y.shape)))
        ):
            problem = f"has a bias of shape {list(c.shape)} that does not broadcast to its output {list(y.shape)}"
    if problem is not None:
        raise ModelLoadError(f"{describe(view)} {problem}")


class MatMul(BaseHandler):
    """MatMul [.., M, K] x [.., K, N]; a constant 2-D right operand is a weight [in, out]."""

    parameter_inputs = (1,)

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return _last(rank) if index == 0 else None

    def relate(self, view: NodeView) -> Relation:
        a, b, y = view.input(0), view.input(1), view.outputs[0]
        if any(t is None or t.shape is None for t in (a, b, y)) or len(a.shape) < 2 or len(b.shape) < 2:
            return Relation([None], pins=[Pin(t.name, f"{describe(view)} has operands of unknown shape")
                                          for t in (a, b) if t is not None and t.is_activation])
        if b.constant and a.is_activation:
            return self._with_weight(view, a, b, y)
        if a.constant or b.constant:
            return Relation([None], pins=[Pin(t.name, f"{describe(view)} multiplies by a constant on the left")
                                          for t in (a, b) if t.is_activation])
        return self._between_activations(view, a, b, y)

    def varying(self, view: NodeView, relation: Relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
        a, y, b = view.input(0), view.outputs[0], view.const(1)
        if relation.pins or b is None or b.ndim != 2 or a.axes != _last(len(a.shape)) or y.axes != _last(len(y.shape)):
            return super().varying(view, relation, inputs)
        result = varying_through_weight(inputs, b.T != 0)
        return super().varying(view, relation, inputs) if result is None else result

    def prune(self, view: NodeView, edit) -> None:
        a, b, y = view.input(0), view.input(1), view.outputs[0]
        if not b.constant or b.shape is None or len(b.shape) != 2:
            return
        keep_in, keep_out = edit.keep(a.name), edit.keep(y.name)
        if keep_in is not None:
            edit.slice_input(1, 0, keep_in)
        if keep_out is not None:
            edit.slice_input(1, 1, keep_out)

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        a, b = view.input(0), view.input(1)
        if b is None or not b.constant or b.shape is None or len(b.shape) != 2 or a is None or a.constant:
            return {}
        return {1: uniform_init(b.shape, b.shape[0], rng, param_dtype(view, 1))}

    def _with_weight(self, view: NodeView, a: TensorInfo, b: TensorInfo, y: TensorInfo) -> Relation:
        out_axes = _last(len(y.shape))
        relation = Relation([out_axes])
        if len(b.shape) != 2:
            relation.pins.append(Pin(a.name, f"{describe(view)} has a batched constant weight"))
        elif a.axes != _last(len(a.shape)):
            relation.pins.append(Pin(a.name, f"{describe(view)} reads features on the last axis, the input's are on {a.axes}"))
        relation.sources.append(Source("weight", y.name, view.name, b.name, axis=len(b.shape) - 1))
        relation.geometry = OpGeometry(
            a.name, len(a.shape) - 1, y.name, len(y.shape) - 1,
            kernel=1, positions=math.prod(y.shape[:-1]), weight=b.name,
        )
        return relation

    def _between_activations(self, view: NodeView, a: TensorInfo, b: TensorInfo, y: TensorInfo) -> Relation:
        return activation_product(view, a, b, y)
