"""LSTM, GRU and RNN: the input features are consumed by W's columns (prunable); the hidden size is
pinned, since every hidden unit feeds back into every gate through R (a zeroed output unit is not a
removed one)."""

from __future__ import annotations

import math

from onnx_morph.handlers.base import (BaseHandler, NodeView, OpGeometry, ParamTerm, Pin, Relation, describe,
                                      has_channels)

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
FEATURES = (2,)  # X is [seq, batch, input] (layout 0) or [batch, seq, input] (layout 1)


class Recurrent(BaseHandler):
    parameter_inputs = (1, 2, 3, 7)  # W, R, B, P

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return FEATURES if index == 0 else None

    def relate(self, view: NodeView) -> Relation:
        x, w = view.input(0), view.input(1)
        axes = [((3,) if i == 0 else (2,)) if t is not None else None for i, t in enumerate(view.outputs)]
        relation = Relation(axes)
        hidden = f"{describe(view)} keeps its hidden size (every hidden unit feeds back into every gate)"
        relation.pins = [Pin(t.name, hidden) for t in view.outputs if t is not None]
        relation.pins += [Pin(t.name, hidden) for t in view.inputs[5:7] if t is not None and t.is_activation]
        for index in (2, 3, 7) if view.op_type == "LSTM" else (2, 3):
            t = view.input(index)
            if t is not None and t.constant and t.shape is not None:
                relation.params.append(ParamTerm(t.name, math.prod(t.shape)))
        if not has_channels(x):
            return relation
        if x.shape is None or w is None or w.shape is None or not w.constant:
            relation.pins.append(Pin(x.name, f"{describe(view)} has a weight of unknown shape or computed from activations"))
            return relation
        if x.axes != FEATURES:
            relation.pins.append(Pin(x.name, f"{describe(view)} reads features on axis 2, the input's are on {x.axes}"))
        if w.computed:
            relation.pins.append(Pin(x.name, f"{describe(view)} has an input weight computed at run time (export with "
                                             "do_constant_folding=True to store it)"))
        y, axis = next(((t, a[0]) for t, a in zip(view.outputs, axes) if t is not None and t.shape is not None),
                       (None, None))
        if y is not None:
            size, directions, steps = int(view.attr("hidden_size", y.shape[axis])), w.shape[0], x.shape[0] * x.shape[1]
            gates = GATES[view.op_type]
            relation.geometry = OpGeometry(x.name, 2, y.name, axis, kernel=gates * directions, positions=steps,
                                           weight=w.name, fixed_macs=steps * directions * gates * size * size)
        return relation

    def prune(self, view: NodeView, edit) -> None:
        keep = edit.keep(view.input(0).name)
        if keep is not None:
            edit.slice_input(1, 2, keep)

