"""Ops that move channels around without computing on them: reshapes, transposes, concat,
split, slice, gather, expand. Relations are computed exactly from the static shapes."""

from __future__ import annotations

import math

import numpy as np

from onnx_morph.errors import InvariantError
from onnx_morph.handlers.base import (BaseHandler, Grid, NodeView, ParamTerm, Pin, Relation, Source, TensorInfo,
                                      Tie, channel_ids, describe, has_channels, identity_tie, normalize_axis,
                                      slice_members)

_MAX_RESHAPE_ELEMENTS = 1 << 26


class Reshape(BaseHandler):
    """Reshape, Flatten, Squeeze, Unsqueeze: follow every channel element through the row-major
    reshape. The output's channel axes are those along which the element index varies; a
    Flatten of [N, C, H, W] gives each channel c the block of H*W features c*HW .. c*HW+HW-1, and a
    split of C into (groups, C/groups) gives two channel axes."""

    follows_ties = True
    preserves_values = True
    parameter_inputs = (0,)

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        if not has_channels(x):
            return Relation([None])
        if y.shape is None or x.shape is None or math.prod(x.shape) != math.prod(y.shape):
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} has an unknown output shape")])
        if math.prod(x.shape) > _MAX_RESHAPE_ELEMENTS:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} is too large to follow channel by channel")])
        ids = np.broadcast_to(channel_ids(x), x.shape).reshape(y.shape)
        varying = tuple(a for a in range(len(y.shape)) if y.shape[a] > 1 and not _constant_along(ids, a))
        if not varying:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} leaves no channel axis")])
        index = tuple(slice(None) if a in varying else slice(0, 1) for a in range(len(y.shape)))
        small = ids[index]
        if not np.array_equal(np.broadcast_to(small, y.shape), ids):
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} mixes channels with other axes")])
        out_elements = small.reshape(-1)
        if len(varying) > 1 and np.unique(out_elements).size < out_elements.size:
            blocks = _whole_channel_slices(small, varying[0], x.channels)
            if blocks is not None:
                return Relation([(varying[0],)], ties=[Tie(y.name, blocks, x.name, np.arange(x.channels, dtype=np.int64))])
        relation = Relation([varying], ties=[Tie(y.name, np.arange(out_elements.size, dtype=np.int64), x.name, out_elements)])
        if len(varying) > 1:
            relation.grids.append(Grid(y.name, f"{describe(view)} splits the channels over axes {list(varying)}"))
        return relation


    def source_axis(self, view: NodeView, axis: int) -> tuple[int, int] | None:
        x, y = view.input(0), view.outputs[0]
        if x is None or x.shape is None or y.shape is None or math.prod(x.shape) > _MAX_RESHAPE_ELEMENTS:
            return None
        for a in range(len(x.shape)):
            if x.shape[a] == y.shape[axis] > 1:
                ids = np.broadcast_to(channel_ids(TensorInfo(x.name, x.shape, (a,))), x.shape).reshape(y.shape)
                if all(_constant_along(ids, b) for b in range(len(y.shape)) if b != axis):
                    return 0, a
        return None

    def entry_source(self, view: NodeView, position: int) -> tuple[int, int]:
        return 0, position  # a reshape keeps the row-major order

    def resize_view(self, view: NodeView, edit, axis: int, count: int) -> None:
        """An explicit extent in the target becomes `count` (a -1 or 0 follows by itself)."""
        if view.op_type != "Reshape" or view.const(1) is None:
            return
        target = np.array(edit.current(1), dtype=np.int64)
        if target[axis] > 0:
            target[axis] = count
            edit.set_input(1, target)

    def prune(self, view: NodeView, edit) -> None:
        """Reshape's target shape gets the new channel count; Flatten/Squeeze/Unsqueeze need nothing."""
        y = view.outputs[0]
        keep = edit.keep(y.name)
        if keep is None or view.op_type != "Reshape":
            return
        axes = self.relate(view).output_axes[0]
        target = np.array(view.const(1) if view.const(1) is not None else y.shape, dtype=np.int64)
        changed = {}
        for axis, extent in kept_extents(TensorInfo(y.name, y.shape, axes), keep, describe(view)).items():
            if target[axis] > 0 and target[axis] != extent:
                target[axis] = changed[axis] = extent
        if view.input(1) is not None and view.input(1).from_shape and edit.set_entries(1, changed):
            return  # the constant pieces changed, the x.size() ones still follow the input
        copies = not view.attr("allowzero", 0)
        if view.input(1) is not None and view.input(1).from_shape:
            if not copies and not (target == 0).any():  # the dynamo exporter's view: 0 may copy again
                edit.set_attr("allowzero", None)
                copies = True
            target = _one_dim_inferred(_leading_dims_copied(view, target, axes, copies), axes)
        else:
            target = _leading_dims_copied(view, target, axes, copies)
        edit.set_input(1, target)

    def batch_free(self, view: NodeView, batch: int) -> dict[int, np.ndarray]:
        """A Reshape target whose first dim is the exported batch copies it from the input instead (0)."""
        x, target = view.input(0), view.const(1)
        if (view.op_type != "Reshape" or target is None or x is None or x.constant or not x.shape
                or view.attr("allowzero", 0) or target.size == 0 or target[0] != batch or x.shape[0] != batch):
            return {}
        target = np.array(target, dtype=np.int64)
        target[0] = 0
        return {1: target}


def _whole_channel_slices(ids: np.ndarray, axis: int, channels: int) -> np.ndarray | None:
    """For a reshape that folds part of the channels into non-channel positions (GroupNorm's
    [N, C, H, W] -> [N, G, C/G * H * W]), the slice along `axis` holding each input channel, when
    every slice holds whole, contiguous, equally many channels: the slices are the channels then,
    and removing one removes its channels' block, which keeps the reshape exact. None otherwise."""
    extent = ids.shape[axis]
    if channels % extent:
        return None
    per_slice = channels // extent
    for g in range(extent):
        if not np.array_equal(np.unique(np.take(ids, g, axis=axis)), np.arange(g * per_slice, (g + 1) * per_slice)):
            return None
    return np.arange(channels, dtype=np.int64) // per_slice


def _one_dim_inferred(target: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """A target computed from the input's shape at run time (a dynamic sequence length), now written as a
    constant: when exactly one of its dims is neither a channel axis nor copied from the input, it is
    inferred (-1), so that the pruned model still takes other sizes there (repeat_kv's [B, H', T, D])."""
    free = [i for i in range(target.size) if i not in axes and target[i] != 0]
    if len(free) != 1 or (target == -1).any():
        return target
    target = target.copy()
    target[free[0]] = -1
    return target


def _leading_dims_copied(view: NodeView, target: np.ndarray, axes: tuple[int, ...], copies: bool = True) -> np.ndarray:
    """The target with its leading dims (before any channel axis) copied from the input (0) where they
    equal it: a target exported as x.size() chains was folded at batch 1, and must not freeze it.
    `copies`: 0 copies the input's dim (allowzero is off)."""
    x = view.input(0)
    if not copies or x.shape is None:
        return target
    target = target.copy()
    first = min(min(axes), min(x.axes or axes), len(x.shape))
    for i in range(first):
        if target[i] == x.shape[i]:
            target[i] = 0
    return target


def kept_extents(info: TensorInfo, keep: np.ndarray, where: str) -> dict[int, int]:
    """Per channel axis, how many entries survive a keep-mask over the tensor's channel elements.

    Raises ValueError (naming `where`) when the kept elements are not a sub-grid: no reshape can
    express them.
    """
    if len(info.axes) == 1:
        return {info.axes[0]: int(keep.sum())}
    grid = keep.reshape([info.shape[a] for a in info.axes]).astype(bool)
    extents, product = {}, np.ones((), dtype=bool)
    for position, axis in enumerate(info.axes):
        others = tuple(p for p in range(grid.ndim) if p != position)
        along = grid.any(axis=others)
        extents[axis] = int(along.sum())
        product = np.multiply.outer(product, along)
    if not np.array_equal(product, grid):
        raise InvariantError(f"{where}: the kept channels of '{info.name}' are not whole slices of its "
                         f"{'x'.join(map(str, grid.shape))} channel grid")
    return extents


def _constant_along(ids: np.ndarray, axis: int) -> bool:
    first = np.take(ids, [0], axis=axis)
    return bool(np.all(ids == first))


class Transpose(BaseHandler):
    follows_ties = True
    preserves_values = True

    def view_permutation(self, node, rank: int) -> tuple[int, ...]:
        perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"), None)
        return perm if perm else tuple(reversed(range(rank)))

    def source_axis(self, view: NodeView, axis: int) -> tuple[int, int] | None:
        x = view.input(0)
        return None if x is None or x.shape is None else (0, self.view_permutation(view.node, len(x.shape))[axis])

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        if not has_channels(x):
            return Relation([None])
        perm = view.attr("perm") or list(reversed(range(len(x.shape))))
        axes = tuple(perm.index(a) for a in x.axes)
        return Relation([axes], ties=[identity_tie(x, TensorInfo(y.name, y.shape, axes))])


class Concat(BaseHandler):
    """On the channel axis the inputs' channels are laid end to end; off it, like an elementwise op."""

    follows_ties = True

    def relate(self, view: NodeView) -> Relation:
        y = view.outputs[0]
        parts = [t for t in view.inputs if t is not None]
        activations = [t for t in parts if t.is_activation]
        unknown = y.shape is None or any(t.shape is None for t in parts)
        if unknown or not activations or any(t.axes is None for t in activations):
            return Relation([None], pins=[Pin(t.name, f"{describe(view)} joins tensors of unknown layout")
                                          for t in activations if t.axes is not None])
        axis = normalize_axis(view.attr("axis"), len(y.shape))
        layouts = {t.axes for t in activations}
        widest = max(layouts, key=len)
        if len(layouts) != 1:
            if axis in widest or any(t.constant for t in parts) or not all(set(layout) <= set(widest)
                                                                            for layout in layouts):
                reason = f"{describe(view)} joins tensors whose channel layouts differ"
                return Relation([None], pins=[Pin(t.name, reason) for t in activations])
            return _grid_concat(view, parts, y, widest, axis)  # a KV cache (heads) joined to new keys (heads x dims)
        axes = layouts.pop()
        out = TensorInfo(y.name, y.shape, axes)
        if axis not in axes:
            relation = Relation([axes], ties=[identity_tie(t, out) for t in activations])
            relation.params = [ParamTerm(t.name, math.prod(t.shape), y.name) for t in parts if t.constant]
            if len(axes) > 1 and any(t.constant for t in parts):
                relation.pins.append(Pin(y.name, f"{describe(view)} joins a constant to channels spread over axes {list(axes)}"))
            return relation
        if axes != (axis,):
            if any(t.constant for t in parts):
                return Relation([None], pins=[Pin(t.name, f"{describe(view)} joins a constant along one of several "
                                                          f"channel axes") for t in activations])
            return _grid_concat(view, parts, y, axes, axis)  # rotary embedding's rotate_half: cat(-x2, x1) on D
        relation = Relation([axes])
        offset = 0
        for t in parts:
            count = t.shape[axis]
            block = np.arange(offset, offset + count, dtype=np.int64)
            if t.constant:
                relation.pins.append(Pin(y.name, f"{describe(view)} concatenates constant channels", block))
                relation.params.append(ParamTerm(t.name, math.prod(t.shape)))
            else:
                relation.ties.append(Tie(t.name, np.arange(count, dtype=np.int64), y.name, block))
            offset += count
        return relation

    def entry_source(self, view: NodeView, position: int) -> tuple[int, int] | None:
        """A 1-D concatenation (a shape assembled from x.size() pieces and constants)."""
        offset = 0
        for index, t in enumerate(view.inputs):
            if t is None or t.shape is None or len(t.shape) != 1:
                return None
            if position < offset + t.shape[0]:
                return index, position - offset
            offset += t.shape[0]
        return None

    def prune(self, view: NodeView, edit) -> None:
        """Constants joined off the channel axis (a class token) lose the removed channels."""
        y = view.outputs[0]
        keep = edit.keep(y.name)
        axes = self.relate(view).output_axes[0]
        if keep is None or axes is None or len(axes) != 1 or normalize_axis(view.attr("axis"), len(y.shape)) in axes:
            return
        for index, t in enumerate(view.inputs):
            if t is not None and t.constant and t.shape[axes[0]] == keep.size:
                edit.slice_input(index, axes[0], keep)


def _grid_concat(view: NodeView, parts: list[TensorInfo], y: TensorInfo, axes: tuple[int, ...], axis: int) -> Relation:
    """Activations joined into a channel grid over `axes`: along one of its axes (the halves of rotary
    embedding's rotate_half, each a sub-grid of heads x D/2), or off them with some parts spanning fewer
    of its axes (a KV cache whose heads are its only channel axis, joined to new keys' heads x dims: each
    cache channel is then tied to the whole slice it lines up with). Parts are activations only."""
    out_ids = channel_ids(TensorInfo(y.name, y.shape, axes))
    relation, offset = Relation([axes]), 0
    for t in parts:
        mine = out_ids
        if axis in axes:
            mine = np.take(out_ids, np.arange(offset, offset + t.shape[axis]), axis=axis)
            offset += t.shape[axis]
        ours, theirs = np.broadcast_arrays(mine, channel_ids(t))
        pairs = np.unique(np.stack([ours.reshape(-1), theirs.reshape(-1)]), axis=1)
        relation.ties.append(Tie(y.name, pairs[0], t.name, pairs[1]))
    return relation


def _subset(view: NodeView, x: TensorInfo, outputs: list[tuple[TensorInfo, np.ndarray | None]], axis: int) -> Relation:
    """Each output keeps the input channels listed for it (None: it does not cut the channel axis)."""
    if axis not in x.axes:
        axes_out = [x.axes] * len(outputs)
        return Relation(axes_out, ties=[identity_tie(x, TensorInfo(y.name, y.shape, x.axes)) for y, _ in outputs])
    relation = Relation([x.axes] * len(outputs))
    ids = channel_ids(x)
    for y, kept in outputs:
        # With channels over several axes (q, k, v out of a [3, H, D] grid) each output is a sub-grid.
        mine = channel_ids(TensorInfo(y.name, y.shape, x.axes)).reshape(-1)
        relation.ties.append(Tie(y.name, mine, x.name, np.take(ids, kept, axis=axis).reshape(-1)))
    return relation


def kept_slices(info: TensorInfo, keep: np.ndarray, axis: int, where: str) -> np.ndarray:
    """Per slice of the tensor along channel axis `axis`, how many copies survive a keep-mask over its
    channel elements (a ValueError naming `where` when the kept elements are not a sub-grid)."""
    if info.axes == (axis,):
        return keep
    kept_extents(info, keep, where)
    return keep.astype(bool)[slice_members(info, axis)].any(axis=1)


class Split(BaseHandler):
    follows_ties = True

    def relate(self, view: NodeView) -> Relation:
        x = view.input(0)
        outputs = view.outputs
        if not has_channels(x):
            return Relation([None] * len(outputs))
        if any(y is None or y.shape is None for y in outputs):
            return Relation([None] * len(outputs), pins=[Pin(x.name, f"{describe(view)} has outputs of unknown shape")])
        axis = normalize_axis(view.attr("axis", 0), len(x.shape))
        parts, offset = [], 0
        for y in outputs:
            size = y.shape[axis]
            parts.append((y, np.arange(offset, offset + size, dtype=np.int64)))
            offset += size
        return _subset(view, x, parts, axis)


    def prune(self, view: NodeView, edit) -> None:
        x = view.input(0)
        keeps = [edit.keep(y.name) for y in view.outputs]
        axis = normalize_axis(view.attr("axis", 0), len(x.shape))
        if all(k is None for k in keeps) or axis not in x.axes:
            return
        sizes = np.array([y.shape[axis] if k is None else
                          int(kept_slices(TensorInfo(y.name, y.shape, x.axes), k, axis, describe(view)).sum())
                          for k, y in zip(keeps, view.outputs)], dtype=np.int64)
        if view.opset >= 13:
            edit.set_attr("num_outputs", None)
            edit.set_input(1, sizes)
        else:
            edit.set_attr("split", sizes.tolist())


class Slice(BaseHandler):
    follows_ties = True
    parameter_inputs = (0,)

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        if not has_channels(x):
            return Relation([None])
        rank = len(x.shape)
        starts, ends, axes, steps = self._bounds(view, rank)
        if starts is None:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} takes its bounds at run time")])
        sliced = [a for a in axes if a in x.axes]
        if not sliced:
            return _subset(view, x, [(y, None)], -1)
        if len(sliced) > 1:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} slices several channel axes at once")])
        position = axes.index(sliced[0])
        if steps[position] != 1:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} takes every {steps[position]}th channel")])
        kept = np.arange(x.shape[sliced[0]], dtype=np.int64)[slice(starts[position], ends[position], steps[position])]
        return _subset(view, x, [(y, kept)], sliced[0])

    def prune(self, view: NodeView, edit) -> None:
        """Bounds on the channel axis become the kept channels' positions in the pruned input."""
        x, y = view.input(0), view.outputs[0]
        keep_in, keep_out = edit.keep(x.name), edit.keep(y.name)
        if keep_in is None or x.axes is None:
            return
        rank = len(x.shape)
        starts, ends, axes, steps = self._bounds(view, rank)
        sliced = [a for a in axes if a in x.axes]
        if not sliced:
            return
        axis, position = sliced[0], axes.index(sliced[0])
        first = range(x.shape[axis])[slice(starts[position], ends[position])].start
        starts[position] = int(kept_slices(x, keep_in, axis, describe(view))[:first].sum())
        kept = y.shape[axis] if keep_out is None else kept_slices(TensorInfo(y.name, y.shape, x.axes), keep_out, axis,
                                                                  describe(view)).sum()
        ends[position] = starts[position] + int(kept)
        if view.input(1) is None:
            edit.set_attr("starts", starts)
            edit.set_attr("ends", ends)
        else:
            edit.set_input(1, np.array(starts, dtype=np.int64))
            edit.set_input(2, np.array(ends, dtype=np.int64))

    @staticmethod
    def _bounds(view: NodeView, rank: int):
        if view.input(1) is None:
            starts, ends = view.attr("starts"), view.attr("ends")
            axes, steps = view.attr("axes"), None
        else:
            values = [view.const(i) if view.input(i) is not None else None for i in range(1, 5)]
            if values[0] is None or values[1] is None or (view.input(3) is not None and values[2] is None) or (
                view.input(4) is not None and values[3] is None
            ):
                return None, None, None, None
            starts, ends = values[0].tolist(), values[1].tolist()
            axes = None if values[2] is None else values[2].tolist()
            steps = None if values[3] is None else values[3].tolist()
        axes = [normalize_axis(int(a), rank) for a in (axes if axes is not None else range(len(starts)))]
        steps = [int(s) for s in steps] if steps is not None else [1] * len(starts)
        return [int(s) for s in starts], [int(e) for e in ends], axes, steps


class Gather(BaseHandler):
    """Gather from an activation by constant indices, or an embedding lookup (constant table)."""

    follows_ties = True

    def index_bound(self, view: NodeView, index: int) -> int | None:
        data = view.input(0)
        if index != 1 or data is None or data.shape is None or not data.shape:
            return None
        return int(data.shape[normalize_axis(view.attr("axis", 0), len(data.shape))])

    def source_axis(self, view: NodeView, axis: int) -> tuple[int, int] | None:
        """A table read at constant indices (Swin's relative position bias): the axes it keeps."""
        data, indices = view.input(0), view.input(1)
        if data is None or data.shape is None or indices is None or not indices.constant or indices.shape is None:
            return None
        gathered = normalize_axis(view.attr("axis", 0), len(data.shape))
        if axis < gathered:
            return 0, axis
        if axis >= gathered + len(indices.shape):
            return 0, axis - len(indices.shape) + 1
        return None
    parameter_inputs = (0,)

    def relate(self, view: NodeView) -> Relation:
        data, indices, y = view.input(0), view.input(1), view.outputs[0]
        if data is None or indices is None or y.shape is None or data.shape is None:
            return Relation([None])
        axis = normalize_axis(view.attr("axis", 0), len(data.shape))
        if data.constant and indices.is_activation:
            if len(data.shape) == 2 and axis == 0:
                out_axes = (len(y.shape) - 1,)
                return Relation(
                    [out_axes],
                    sources=[Source("weight", y.name, view.name, data.name, axis=1)],
                    params=[ParamTerm(data.name, math.prod(data.shape), y.name)],
                )
            return Relation([None], pins=[Pin(y.name, f"{describe(view)} gathers from a constant table")])
        if data.axes is None or data.constant:
            return Relation([None])
        if indices.is_activation:
            return Relation([None], pins=[Pin(data.name, f"{describe(view)} gathers by run-time indices")])
        chosen = np.asarray(view.const(1)).astype(np.int64)
        if axis in data.axes and len(data.axes) > 1 and chosen.ndim == 0:
            return _slice_of_grid(data, y, axis, int(chosen))
        if axis in data.axes:
            if data.axes != (axis,) or chosen.ndim != 1:
                return Relation([None], pins=[Pin(data.name, f"{describe(view)} picks single channels")])
            kept = np.where(chosen < 0, chosen + data.shape[axis], chosen)
            return _subset(view, data, [(y, kept)], axis)
        shift = chosen.ndim - 1
        axes = tuple(a if a < axis else a + shift for a in data.axes)
        return Relation([axes], ties=[identity_tie(data, TensorInfo(y.name, y.shape, axes))])


    def prune(self, view: NodeView, edit) -> None:
        data, y = view.input(0), view.outputs[0]
        keep_out = edit.keep(y.name)
        if data.constant:
            if keep_out is not None and len(data.shape) == 2:
                edit.slice_input(0, 1, keep_out)
            return
        keep_in = edit.keep(data.name)
        axis = normalize_axis(view.attr("axis", 0), len(data.shape))
        if keep_in is not None and data.axes is not None and len(data.axes) > 1 and axis in data.axes:
            _renumber_grid_slice(view, edit, data, keep_in, axis)
            return
        if keep_in is None or data.axes != (axis,):
            return
        chosen = np.asarray(view.const(1)).astype(np.int64)
        chosen = np.where(chosen < 0, chosen + keep_in.size, chosen)
        edit.set_input(1, _copied_positions(keep_in, chosen))


def _copied_positions(copies: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Where the copies of the chosen channels sit once channel c appears copies[c] times."""
    first = np.cumsum(copies) - copies
    counts = copies[chosen].astype(np.int64)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(first[chosen], counts) + within


def _slice_of_grid(data: TensorInfo, y: TensorInfo, axis: int, index: int) -> Relation:
    """Gather of one slice of a channel grid (Q, K or V out of a fused [3, E] projection): the output's
    channels are that slice's."""
    index = index + data.shape[axis] if index < 0 else index
    out_axes = tuple(a if a < axis else a - 1 for a in data.axes if a != axis)
    taken = np.take(channel_ids(data), [index], axis=axis).squeeze(axis)
    mine = channel_ids(TensorInfo(y.name, y.shape, out_axes))
    mine, taken = np.broadcast_arrays(mine, taken)
    return Relation([out_axes], ties=[Tie(y.name, mine.reshape(-1), data.name, taken.reshape(-1))])


def _renumber_grid_slice(view: NodeView, edit, data: TensorInfo, keep: np.ndarray, axis: int) -> None:
    """The gathered slice's index among the slices that survive along the grid's axis."""
    extent = data.shape[axis]
    position = data.axes.index(axis)
    dims = [data.shape[a] for a in data.axes]
    kept = np.moveaxis(keep.reshape(dims).astype(bool), position, 0).reshape(extent, -1).any(axis=1)
    index = int(np.asarray(view.const(1)))
    index = index + extent if index < 0 else index
    if not kept[index]:
        raise InvariantError(f"{describe(view)} gathers slice {index} of '{data.name}', which pruning removes")
    if not kept.all():
        edit.set_input(1, np.array(int(kept[:index].sum()), dtype=np.int64))


class Expand(BaseHandler):
    """Broadcast to a larger shape: channels pass when the channel dims are already full size; a
    tensor without channels (a norm over the channels) broadcast along one axis gets new channels
    there, copies of one value, which its consumer ties (x / ||x||.expand_as(x))."""

    parameter_inputs = (0,)

    follows_ties = True
    preserves_values = True

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        if x is None or x.constant or y.shape is None or x.shape is None:
            return Relation([None])
        shift = len(y.shape) - len(x.shape)
        if x.axes is None:
            spread = [a for a in range(1, len(y.shape)) if a < shift or (x.shape[a - shift] == 1 and y.shape[a] > 1)]
            if len(spread) != 1:
                return Relation([None])
            return Relation([tuple(spread)], copies=[y.name])
        axes = tuple(a + shift for a in x.axes)
        if all(x.shape[a] == y.shape[a + shift] for a in x.axes):
            relation = Relation([axes], ties=[identity_tie(x, TensorInfo(y.name, y.shape, axes))])
            if len(axes) > 1 and view.const(1) is None:
                relation.pins.append(Pin(x.name, f"{describe(view)} broadcasts channels spread over axes {list(axes)} "
                                                 f"to a shape computed at run time"))
            return relation
        return Relation([None], pins=[Pin(x.name, f"{describe(view)} broadcasts along the channel axis")])

    def prune(self, view: NodeView, edit) -> None:
        """The target's channel extent shrinks; extents the input already has become 1 (broadcast
        gives them back), so a batch size folded into the target at load time is not frozen."""
        x, y = view.input(0), view.outputs[0]
        keep = edit.keep(y.name)
        shape = view.const(1)
        if keep is None or shape is None:
            return
        axes = self.relate(view).output_axes[0]
        target = np.array(shape, dtype=np.int64)
        offset = len(y.shape) - target.size
        for axis, extent in kept_extents(TensorInfo(y.name, y.shape, axes), keep, describe(view)).items():
            if axis - offset >= 0 and target[axis - offset] > 1:
                target[axis - offset] = extent
        # Extents the input already has become 1 (broadcast gives them back), so a size folded into the
        # target at load time (a batch, a sequence length computed from x.size()) is not frozen.
        shift = len(y.shape) - len(x.shape)
        for axis in range(max(offset, shift), len(y.shape)):
            if axis not in axes and x.shape[axis - shift] == y.shape[axis]:
                target[axis - offset] = 1
        edit.set_input(1, target)


class DepthToSpace(BaseHandler):
    """Pixel shuffle: blocks of blocksize^2 input channels become one output channel's sub-pixels.

    DCR mode reads input channel (i * b + j) * C + c into output channel c, CRD mode c * b^2 + i * b + j;
    SpaceToDepth writes input channel c into output channel (i * b + j) * C + c. Each such set of
    b^2 channels is one channel, and the kept channels keep that layout: no attribute changes."""

    def preferred_axes(self, view: NodeView, index: int, rank: int):
        return (1,) if index == 0 else None

    def relate(self, view: NodeView) -> Relation:
        x, y = view.input(0), view.outputs[0]
        if not has_channels(x):
            return Relation([None])
        if x.axes != (1,) or x.shape is None or y.shape is None or len(x.shape) != 4:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} needs NCHW channels on axis 1")])
        if view.op_type == "SpaceToDepth":
            out = np.arange(y.shape[1], dtype=np.int64)
            return Relation([(1,)], ties=[Tie(y.name, out, x.name, out % x.shape[1])])
        channels = np.arange(x.shape[1], dtype=np.int64)
        mode = view.attr("mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        out = channels // int(view.attr("blocksize")) ** 2 if mode == "CRD" else channels % y.shape[1]
        return Relation([(1,)], ties=[Tie(x.name, channels, y.name, out)])


class Tile(BaseHandler):
    """Repeats the input along axes: channels pass when no channel axis is repeated (torch's
    repeat_interleave of grouped-query attention's KV heads: [B, KV, 1, T, D] tiled to [B, KV, H/KV, T, D]).
    The repeats are counts, not extents, so surgery leaves them."""

    follows_ties = True

    def relate(self, view: NodeView) -> Relation:
        x, y, repeats = view.input(0), view.outputs[0], view.const(1)
        if not has_channels(x) or y.shape is None:
            return Relation([None])
        if repeats is None:
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} takes its repeats at run time")])
        if any(int(repeats[a]) != 1 for a in x.axes):
            return Relation([None], pins=[Pin(x.name, f"{describe(view)} repeats along the channel axis")])
        return Relation([x.axes], ties=[identity_tie(x, TensorInfo(y.name, y.shape, x.axes))])
