"""Surgery: change how many copies of each channel every tensor holds, asking each node's handler
which parameters and shape constants to resize. Pruning keeps 0 or 1 copy of each channel, and
the result computes what the original computes with the dead channels set to zero; expansion
keeps several copies of some channels, and only the shapes of the result matter."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_morph.graph.channel_graph import ChannelGraph, node_view
from onnx_morph.errors import InvariantError
from onnx_morph.handlers import handler_for
from onnx_morph.rewrite.editing import drop_unused


def keep_masks(graph: ChannelGraph, alive: np.ndarray) -> dict[str, np.ndarray]:
    """Per tensor with removed channels, the keep-mask over its channel elements."""
    return copies_per_tensor(graph, alive.astype(bool))


def copies_per_tensor(graph: ChannelGraph, copies: np.ndarray) -> dict[str, np.ndarray]:
    """Per tensor whose channels change, how many copies of each channel element it keeps."""
    per_tensor = {}
    for tensor in graph.offsets:
        count = copies[graph.classes(tensor)]
        if not (count == 1).all():
            per_tensor[tensor] = count
    return per_tensor


class _NodeEditor:
    """The Editor handed to one handler: changes go to new initializers, never the shared originals."""

    def __init__(self, surgery: "_Surgery", name: str, node: onnx.NodeProto):
        self.surgery, self.name, self.node = surgery, name, node

    def keep(self, tensor: str) -> np.ndarray | None:
        return self.surgery.copies.get(tensor)

    def removed_values(self, tensor: str) -> np.ndarray | None:
        values = self.surgery.removed.get(tensor)
        return None if values is None or not values.any() else values

    def folded(self, tensor: str) -> None:
        self.surgery.folded[(self.name, tensor)] = self.surgery.removed[tensor]

    def slice_input(self, index: int, axis: int, copies: np.ndarray) -> None:
        if self._slice_view(self.node.input[index], axis, copies):
            self.surgery.sliced_views.add((self.name, index))
            return
        if (self.name, index) in self.surgery.sliced_views:
            raise ValueError(f"{self.node.op_type} node '{self.name}': input {index} was sliced at its initializer "
                             f"along one axis and cannot be sliced along axis {axis} too")
        value = self.current(index)
        if value.shape[axis] != copies.size:
            raise InvariantError(
                f"{self.node.op_type} node '{self.name}': input {index} has {value.shape[axis]} entries on axis {axis}, "
                f"the channel mask {copies.size}"
            )
        self.set_input(index, np.repeat(value, copies.astype(np.int64), axis=axis))

    def _slice_view(self, name: str, axis: int, copies: np.ndarray) -> bool:
        """A constant laid out from an initializer (Swin's relative position bias from its table) is
        sliced at the initializer, the nodes on the way updating their shape constants."""
        graph = self.surgery.graph
        chain = None if graph.param_root(name) is not None else graph.view_chain(name, axis)
        if chain is None:
            return False
        for step, (node_name, index, in_axis, out_axis) in enumerate(chain):
            editor = _NodeEditor(self.surgery, node_name, self.surgery.nodes[node_name])
            view = node_view(graph, node_name)
            handler = handler_for(view.node.op_type, view.node.domain)
            if step == 0:
                editor.slice_input(index, in_axis, copies)
            handler.slice_view(view, editor, out_axis, copies)
        return True

    def _store_at_source(self, name: str, value: np.ndarray) -> bool:
        """A parameter an op lays out from integers (a QDQ model's int32 bias behind DequantizeLinear)
        takes a new value in its stored form, so the node keeps reading quantized parameters."""
        graph = self.surgery.graph
        if not name or graph.param_root(name) is not None or graph.stored_param(name) is None:
            return False
        chain = next((c for axis in range(value.ndim) if (c := graph.view_chain(name, axis)) is not None), None)
        if chain is None or len(chain) != 1:
            return False
        producer = chain[0][0]
        view = node_view(graph, producer)
        editor = _NodeEditor(self.surgery, producer, self.surgery.nodes[producer])
        return handler_for(view.node.op_type, view.node.domain).store_value(view, editor, value)

    def current(self, index: int) -> np.ndarray:
        return self.surgery.value(self.node.input[index])

    def set_entries(self, index: int, values: dict[int, int]) -> bool:
        graph = self.surgery.graph
        origins = {position: graph.entry_origin(self.node.input[index], position) for position in values}
        if not values or any(origin is None for origin in origins.values()):
            return False
        for position, (node_name, input_index, entry) in origins.items():
            editor = _NodeEditor(self.surgery, node_name, self.surgery.nodes[node_name])
            value = np.array(editor.current(input_index))
            value.reshape(-1)[entry] = values[position]
            editor.set_input(input_index, value)
        return True

    def set_input(self, index: int, value: np.ndarray) -> None:
        if index < len(self.node.input) and self._store_at_source(self.node.input[index], value):
            return
        while len(self.node.input) <= index:
            self.node.input.append("")
        created = not self.node.input[index]
        name = self.surgery.new_initializer(self.node.input[index] or f"{self.name}_input{index}", value)
        self.node.input[index] = name
        if created:
            self.surgery.created.add(name)

    def set_attr(self, name: str, value) -> None:
        kept = [a for a in self.node.attribute if a.name != name]
        del self.node.attribute[:]
        self.node.attribute.extend(kept)
        if value is not None:
            self.node.attribute.append(onnx.helper.make_attribute(name, value))


class _Surgery:
    def __init__(self, graph: ChannelGraph, copies: dict[str, np.ndarray], removed: dict[str, np.ndarray]):
        self.graph, self.copies, self.removed = graph, copies, removed
        self.folded: dict[tuple[str, str], np.ndarray] = {}
        self.nodes: dict[str, onnx.NodeProto] = {}  # the copy's nodes, by the graph's node names
        self.sliced_views: set[tuple[str, int]] = set()  # (node, input) sliced at the initializer it views
        self.created: set[str] = set()
        self.added: dict[str, None] = {}  # the new initializers' names, in order (values: `values`)
        self.values: dict[str, np.ndarray] = {}
        self.names = Counter(t.name for t in graph.model.graph.initializer)
        self.names.update(o for n in graph.model.graph.node for o in n.output)

    def value(self, name: str) -> np.ndarray:
        if name in self.values:
            return self.values[name]
        value = self.graph.constant(name)
        if value is None:
            raise InvariantError(f"'{name}' is computed at run time; surgery cannot shrink it")
        return value

    def new_initializer(self, base: str, value: np.ndarray) -> str:
        name = base if base in self.added else self._fresh(base)
        self.values[name] = value
        self.added[name] = None
        return name

    def _fresh(self, base: str) -> str:
        stem = base.split("::pruned")[0]
        count = self.names[stem + "::pruned"]
        self.names[stem + "::pruned"] += 1
        return f"{stem}::pruned" if count == 0 else f"{stem}::pruned{count}"


@dataclass
class Surgery:
    """The pruned model, and which consumers absorbed removed channels' constants (node, tensor) -> values."""

    model: onnx.ModelProto
    folded: dict[tuple[str, str], np.ndarray]
    new_parameters: int = 0  # biases created to hold folded constants
    # With `deferred`: the data of the new initializers that `model` holds as placeholders (external,
    # without a location), which LoadedModel.encoded_parts and materialized fill in.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def remove_channels(
    graph: ChannelGraph, alive: np.ndarray, original: onnx.ModelProto, removed: dict[str, np.ndarray] | None = None,
    *, deferred: bool = False,
) -> Surgery:
    """A copy of `original` (the graph's model with its weights) without the channels of dead classes.

    A dead channel is not exactly zero (after BatchNorm it holds beta, after ReLU relu(beta));
    consumers fold the constants in `removed` (see removed_channel_values) into their bias where
    doing so is exact. With `deferred`, the new weights stay arrays (Surgery.arrays) behind
    placeholders, which encoding the model copies once, rather than through a TensorProto.
    """
    return resize_channels(graph, alive.astype(np.int64), original, removed, deferred=deferred)


def resize_channels(
    graph: ChannelGraph, copies: np.ndarray, original: onnx.ModelProto, removed: dict[str, np.ndarray] | None = None,
    *, deferred: bool = False,
) -> Surgery:
    """A copy of `original` in which channel class c appears copies[c] times, in place of once."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(original)
    surgery = _Surgery(graph, copies_per_tensor(graph, copies), removed or {})
    nodes = surgery.nodes = dict(zip(graph.order, pruned.graph.node))
    for name in graph.relations:
        node = nodes[name]
        handler_for(node.op_type, node.domain).prune(node_view(graph, name), _NodeEditor(surgery, name, node))
    arrays = _add_initializers(pruned, surgery, deferred)
    del pruned.graph.value_info[:]
    drop_unused(pruned.graph)
    return Surgery(pruned, surgery.folded, sum(surgery.values[name].size for name in surgery.created), arrays)


def _add_initializers(pruned: onnx.ModelProto, surgery: _Surgery, deferred: bool) -> dict[str, np.ndarray]:
    """Append the new initializers; with `deferred`, those of plain numeric types as placeholders
    (name, type, shape, external data) whose arrays are returned."""
    arrays = {}
    for name in surgery.added:
        value = np.ascontiguousarray(surgery.values[name])
        tensor = pruned.graph.initializer.add()
        if not (deferred and value.dtype.kind in "biuf" and value.dtype.isnative and value.dtype.itemsize <= 8
                and sys.byteorder == "little"):
            # add().CopyFrom, not extend: the upb protobuf runtime copies appended messages through
            # serialization, which fails for a tensor over 2 GB.
            tensor.CopyFrom(numpy_helper.from_array(value, name))
            continue
        arrays[name] = value
        tensor.name, tensor.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor.dims.extend(value.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
    return arrays


def probed_tensors(graph: ChannelGraph, masks: dict[str, np.ndarray]) -> list[str]:
    """Tensors with removed channels that a weighted op reads: where folding constants can pay off."""
    return sorted({
        r.geometry.input for r in graph.relations.values()
        if r.geometry is not None and r.geometry.input in masks
        and graph.tensors[r.geometry.input].axes is not None and len(graph.tensors[r.geometry.input].axes) == 1
    })


def removed_channel_values(
    graph: ChannelGraph, masks: dict[str, np.ndarray], samples: dict[str, list[np.ndarray]],
    proven: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The constant each removed channel holds, from its values on sample inputs: a channel counts as
    constant only if it takes one value over every position, and is either proven independent of the
    inputs (`proven`, per tensor: graph.dependence.input_dependence's False) or takes that value in
    every one of at least two samples (a channel dead by a weight norm, or one value per sample after
    global pooling, is not).

    A dead channel (beta after a zero gamma) does not depend on the input at all, so each position
    holds bit-identical values in every sample; a channel after global pooling has one value per
    sample, and two samples of a live one can agree to 1e-6 by chance (it happened), but hardly to
    the bit. Over positions the spread is measured against the channel's own value: against the
    tensor's largest channel, a small varying channel could pass for constant."""
    removed = {}
    for tensor, values in samples.items():
        known = (proven or {}).get(tensor)
        if not values or (len(values) < 2 and (known is None or not known.any())):
            continue
        axis = graph.tensors[tensor].axes[0]
        stack = np.stack([np.moveaxis(np.asarray(v), axis, 0).reshape(v.shape[axis], -1) for v in values])
        input_independent = np.all(stack == stack[:1], axis=(0, 2))
        if len(values) < 2:
            input_independent &= known
        flat = stack[0].astype(np.float64)
        mean = flat.mean(axis=1)
        spread = flat.max(axis=1) - flat.min(axis=1)
        scale = float(np.abs(flat).max()) or 1.0  # values negligible at the tensor's scale are not folded
        constant = (~masks[tensor]) & input_independent & (spread <= 1e-6 * np.abs(mean)) & (np.abs(mean) > 1e-6 * scale)
        removed[tensor] = np.where(constant, mean, 0.0)
    return removed
