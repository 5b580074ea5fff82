"""MatMul of two activations, as in attention (Q x K^T, weights x V): which elements of the operands
and of the product live or die together.

The product [.., M, K] x [.., K, N] -> [.., M, N] is followed element by element over the index
space (batch dims, M, K, N). Every product element is tied to every operand element that feeds it,
and the operands' contracted elements to each other. With the heads on a batch axis this ties
Q head h, K head h, the scores of head h and V head h into one unit, and all D elements of a head
with it: whole heads die, as a reshape of [H, D] heads needs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from onnx_morph.handlers.base import (
    NodeView,
    OpGeometry,
    Pin,
    Relation,
    TensorInfo,
    Tie,
    describe,
)
from onnx_morph.handlers.base import channel_ids


def activation_product(view: NodeView, a: TensorInfo, b: TensorInfo, y: TensorInfo) -> Relation:
    """The relation of Y = A @ B for two activations with static shapes of rank >= 2."""
    ra, rb, ry = len(a.shape), len(b.shape), len(y.shape)
    batch = ry - 2
    m, k, n = batch, batch + 1, batch + 2
    place_a = {axis: (axis + batch - (ra - 2) if axis < ra - 2 else (m if axis == ra - 2 else k)) for axis in range(ra)}
    place_b = {axis: (axis + batch - (rb - 2) if axis < rb - 2 else (k if axis == rb - 2 else n)) for axis in range(rb)}
    chan_a = {place_a[axis] for axis in a.axes or ()}
    chan_b = {place_b[axis] for axis in b.axes or ()}
    size_a = {place: a.shape[axis] for axis, place in place_a.items()}
    size_b = {place: b.shape[axis] for axis, place in place_b.items()}

    problem = _unfollowable(chan_a, chan_b, size_a, size_b, k, m, n)
    if problem is not None:
        reason = f"{describe(view)} multiplies two activations whose channel axes it cannot follow ({problem})"
        return Relation([None], pins=[Pin(t.name, reason) for t in (a, b) if t.axes is not None],
                        geometry=_plain_geometry(a, b, y))
    chan_y = sorted((chan_a | chan_b) - {k})
    y_axes = tuple(place if place < batch else (ry - 2 if place == m else ry - 1) for place in chan_y)
    relation = Relation([y_axes or None], geometry=_geometry(a, b, y, chan_a, chan_b, place_a, place_b, batch),
                        product=True)

    space = [_expand_a(a, batch), _expand_b(b, batch)]
    names = [a.name, b.name]
    if y_axes:
        space.append(_expand_y(TensorInfo(y.name, y.shape, y_axes)))
        names.append(y.name)
    present = [(name, ids) for name, ids in zip(names, space) if ids is not None]
    arrays = np.broadcast_arrays(*(ids for _, ids in present))
    flat = [(name, ids.reshape(-1)) for (name, _), ids in zip(present, arrays)]
    for (first, first_ids), (second, second_ids) in itertools.combinations(flat, 2):
        pairs = np.unique(np.stack([first_ids, second_ids]), axis=1)
        relation.ties.append(Tie(first, pairs[0], second, pairs[1]))
    return relation


def _unfollowable(chan_a: set[int], chan_b: set[int], size_a: dict, size_b: dict, k: int, m: int, n: int) -> str | None:
    if (k in chan_a) != (k in chan_b):
        return "only one operand has channels on the contracted axis"
    if m in chan_a and n in chan_b:
        return "the product's rows and columns would both be channels"
    for place in (chan_a | chan_b) - {k, m, n}:
        other = size_b if place in chan_a else size_a
        if place not in (chan_a & chan_b) and other.get(place, 1) > 1:
            return "one operand broadcasts channels along a batch axis the other spans"
        if place in (chan_a & chan_b) and size_a[place] != size_b[place]:
            return "the operands' batch channels differ in size"
    return None


def _expand_a(a: TensorInfo, batch: int) -> np.ndarray | None:
    """A's element ids over the index space (batch.., M, K, N)."""
    if a.axes is None:
        return None
    ids = channel_ids(a)
    return ids.reshape((1,) * (batch + 2 - ids.ndim) + ids.shape + (1,))


def _expand_b(b: TensorInfo, batch: int) -> np.ndarray | None:
    if b.axes is None:
        return None
    ids = channel_ids(b)
    return ids.reshape((1,) * (batch + 2 - ids.ndim) + ids.shape[:-2] + (1,) + ids.shape[-2:])


def _expand_y(y: TensorInfo) -> np.ndarray:
    ids = channel_ids(y)
    return ids.reshape(ids.shape[:-1] + (1,) + ids.shape[-1:])


def _plain_geometry(a: TensorInfo, b: TensorInfo, y: TensorInfo) -> OpGeometry:
    """Cost of the product as K inputs by N outputs at every other output position."""
    ra, ry = len(a.shape), len(y.shape)
    return OpGeometry(a.name, ra - 1, y.name, ry - 1, kernel=1, positions=math.prod(y.shape[:-1]), second_input=b.name)


def _geometry(a: TensorInfo, b: TensorInfo, y: TensorInfo, chan_a: set[int], chan_b: set[int],
              place_a: dict, place_b: dict, batch: int) -> OpGeometry:
    """With heads on a batch axis, the cost is alive heads x N at the other batch positions x M, K
    multiplies each, so pruned heads leave the count; otherwise K inputs by N outputs."""
    heads = sorted((chan_a | chan_b) - {batch, batch + 1, batch + 2})
    if not heads:
        return _plain_geometry(a, b, y)
    place = heads[0]
    operand, placement, other = (a, place_a, b) if place in chan_a else (b, place_b, a)
    axis = next(ax for ax, p in placement.items() if p == place)
    ry = len(y.shape)
    positions = math.prod(y.shape[:place]) * math.prod(y.shape[place + 1:ry - 1])
    return OpGeometry(operand.name, axis, y.name, ry - 1, kernel=a.shape[-1], positions=positions,
                      second_input=other.name)
