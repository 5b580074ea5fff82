"""The channel graph: ONNX nodes joined by activation tensors, and every channel of every
activation as an element of a union-find structure that the op handlers tie together."""

from __future__ import annotations

import ast

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx

from onnx_morph.errors import ModelLoadError
from onnx_morph.graph.grid import slice_classes, sliced_axis
from onnx_morph.graph.groups import ChannelGroup, build_groups
from onnx_morph.graph.load import LoadedModel
from onnx_morph.handlers import NodeView, Pin, Relation, TensorInfo, handler_for, is_known

# Every channel of every activation is an element of the union-find arrays: bound their memory.
MAX_CHANNELS = 2**24
MAX_CHANNEL_ELEMENTS = 2**25
# Constants re-laid out from an initializer are followed up to this size (position bias tables are small).
_MAX_VIEW_ELEMENTS = 2**22
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# Integer weights and int32 biases of quantized models (read by QLinearConv, or dequantized): parameters too.
QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                   onnx.TensorProto.INT32}


@dataclass
class ChannelGraph:
    """Activations, node relations and channel classes of one model.

    Element e of tensor t is `offsets[t] + e`; `class_of[element]` is its channel class (the set
    of channels that live or die together); `groups` collects classes that span the same tensors.
    """

    model: LoadedModel
    order: list[str]
    nodes: dict[str, onnx.NodeProto]
    tensors: dict[str, TensorInfo]
    relations: dict[str, Relation]
    offsets: dict[str, int]
    class_of: np.ndarray
    class_pins: dict[int, list[str]]
    groups: list[ChannelGroup]
    aliases: dict[str, tuple[str, tuple[int, ...] | None]]
    static: set[str] = field(default_factory=set)
    unknown_ops: dict[str, list[str]] = field(default_factory=dict)
    views: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)

    @cached_property
    def nx(self):
        """networkx.MultiDiGraph of op nodes and graph inputs/outputs, one edge per (tensor, consumer)
        with the tensor's shape and channel axes; built on first use (networkx is slow to import)."""
        return _networkx(self.model, self.nodes, self.tensors)

    @cached_property
    def module_paths(self) -> dict[str, str]:
        """Node name -> the torch module that produced it ("layer1.0.conv1"), where the export says
        (torch's dynamo exporter names nodes node_Conv_292 and keeps the module path in metadata)."""
        return {name: path for name, node in self.nodes.items() if (path := module_path(node))}

    @property
    def num_classes(self) -> int:
        return int(self.class_of.max()) + 1 if self.class_of.size else 0

    def classes(self, tensor: str) -> np.ndarray | None:
        """Channel class of each channel element of `tensor`, or None if it has no channel layout."""
        if tensor not in self.offsets:
            return None
        start = self.offsets[tensor]
        return self.class_of[start:start + self.tensors[tensor].channels]

    def axis_classes(self, tensor: str, axis: int) -> np.ndarray | None:
        """Class of each slice of `tensor` along `axis`; None when that axis never shrinks on its own."""
        classes = self.classes(tensor)
        return None if classes is None else slice_classes(self.tensors[tensor], classes, axis)

    def param_root(self, name: str) -> tuple[str, tuple[int, ...] | None] | None:
        """The initializer behind a constant input (seen through Identity/Transpose) and the permutation applied."""
        return param_root(self.model, self.aliases, name)

    def stored_param(self, name: str) -> str | None:
        """The initializer a constant input is stored as: itself or what it views (param_root), or the
        integers an op dequantizes (a QDQ model's int8 weight behind DequantizeLinear)."""
        root = self.param_root(name)
        if root is not None:
            return root[0]
        node = self.nodes.get(self._producers.get(name, ""))
        if node is None or not handler_for(node.op_type, node.domain).stored_as_input or not node.input:
            return None
        root = self.param_root(node.input[0])
        return None if root is None else root[0]

    def stored_dtype(self, tensor: str) -> int:
        """The type a tensor's values are stored at: an activation dequantized from integers (QDQ) at
        the integers' type, one that is only quantized at the quantized type."""
        dtypes = self.model.dtypes
        producer = self.nodes.get(self._producers.get(tensor, ""))
        if producer is not None and handler_for(producer.op_type, producer.domain).stored_as_input:
            return dtypes.get(producer.input[0], dtypes.get(tensor, onnx.TensorProto.FLOAT))
        readers = self._readers.get(tensor, [])
        if readers and all(handler_for(n.op_type, n.domain).stored_as_output for n in readers):
            return dtypes.get(readers[0].output[0], dtypes.get(tensor, onnx.TensorProto.FLOAT))
        return dtypes.get(tensor, onnx.TensorProto.FLOAT)

    @cached_property
    def _readers(self) -> dict[str, list[onnx.NodeProto]]:
        readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes.values():
            for tensor in dict.fromkeys(i for i in node.input if i):
                readers[tensor].append(node)
        return readers

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant input, also where the weightless load left it unevaluated: a view
        of an initializer (an exporter's Identity alias, a Transpose), or a weight computed from
        constants; None if it depends on the graph's inputs."""
        value = resolved_constant(self.model, self.aliases, name)
        if value is None and name in self.static:
            value = self.model.computed_constant(name)
        return value

    def view_chain(self, tensor: str, axis: int) -> list[tuple[str, int, int, int]] | None:
        """How constant `tensor` is laid out from an initializer along `axis` (see _record_view): per
        node from the initializer up, (node, its input index, that input's axis, its output axis).
        None unless every tensor on the way feeds only the next node, so slicing them changes nothing else."""
        if axis not in self.views.get(tensor, {}):
            return None
        chain = []
        while self.model.initializer(tensor) is None:
            producer = self._producers.get(tensor)
            if producer is None or self._uses[tensor] != 1:
                return None
            found = handler_for(self.nodes[producer].op_type, self.nodes[producer].domain).source_axis(
                node_view(self, producer), axis)
            if found is None:
                return None
            chain.append((producer, found[0], found[1], axis))
            tensor, axis = self.nodes[producer].input[found[0]], found[1]
        return chain[::-1]

    def entry_origin(self, tensor: str, position: int) -> tuple[str, int, int] | None:
        """Where entry `position` of a shape computed at run time comes from: (node, input index, flat
        entry) where that input is a constant that no input's shape changes (an initializer, a Constant,
        or a value folded from those), through nodes that pass the entry unchanged (handlers' entry_source), each tensor on the
        way feeding only the next node. None otherwise (the entry is an x.size() piece, or shared)."""
        while True:
            producer = self._producers.get(tensor)
            if producer is None or self._uses[tensor] != 1:
                return None
            node = self.nodes[producer]
            found = handler_for(node.op_type, node.domain).entry_source(node_view(self, producer), position)
            if found is None:
                return None
            index, position = found
            source = node.input[index]
            if source not in self.model.shape_derived and self.model.constant(source) is not None:
                return producer, index, position
            tensor = source

    @cached_property
    def _producers(self) -> dict[str, str]:
        return {o: name for name, node in self.nodes.items() for o in node.output if o}

    @cached_property
    def _uses(self) -> Counter:
        uses = Counter(o.name for o in self.model.graph.output)
        for node in self.nodes.values():
            uses.update({*(i for i in node.input if i), *outer_references(node)})
        return uses

    def trained_sources(self, tensor: str) -> tuple[str, ...]:
        """The float initializers a constant tensor is read from: itself (or the weight it views through
        Identity/Transpose), or those a constant subgraph computes it from through the nodes' parameter
        inputs (a position table gathered by constant ids, an unsqueezed scale, a normalized weight)."""
        if tensor not in self._sources:
            self._sources[tensor] = self._find_sources(tensor)
        return self._sources[tensor]

    def _find_sources(self, tensor: str) -> tuple[str, ...]:
        root = self.param_root(tensor)
        if root is not None:
            return (root[0],) if self.model.initializer(root[0]).data_type in FLOAT_TYPES | QUANTIZED_TYPES else ()
        found: dict[str, None] = {}
        frontier, seen = [tensor], {tensor}
        while frontier:
            producer = self._static_producers.get(frontier.pop())
            if producer is None:
                continue
            node = self.nodes[producer]
            handler = handler_for(node.op_type, node.domain)
            indices = handler.parameter_inputs
            for index, name in enumerate(node.input):
                if not name or name in seen or (indices is not None and index not in indices):
                    continue
                seen.add(name)
                initializer = self.model.initializer(name)
                if initializer is None:
                    frontier.append(name)
                elif initializer.data_type in FLOAT_TYPES or (
                        index == 0 and handler.stored_as_input and initializer.data_type in QUANTIZED_TYPES):
                    found[name] = None
        return tuple(found)

    @cached_property
    def _sources(self) -> dict[str, tuple[str, ...]]:
        return {}

    @cached_property
    def _static_producers(self) -> dict[str, str]:
        """The node computing each static tensor (constant subgraphs the channel graph skips)."""
        return {o: name for name, node in self.nodes.items() for o in node.output if o in self.static}

    def class_pinned(self) -> np.ndarray:
        pinned = np.zeros(self.num_classes, dtype=bool)
        pinned[list(self.class_pins)] = True
        return pinned


def build_channel_graph(model: LoadedModel) -> ChannelGraph:
    """Ask every node's handler how its channels relate, then unite the related channels."""
    names = _unique_names(model.graph.node)
    nodes = dict(zip(names, model.graph.node))
    related = _relate_nodes(model, nodes)
    offsets = _offsets(model, related.tensors)
    class_of, class_pins = _unite(model, nodes, related, offsets)
    classes = {t: class_of[start:start + related.tensors[t].channels] for t, start in offsets.items()}
    groups = build_groups(classes, int(class_of.max()) + 1 if class_of.size else 0, class_pins, related.relations,
                          nodes, lambda name: param_root(model, related.aliases, name))
    return ChannelGraph(model, names, nodes, related.tensors, related.relations, offsets, class_of, class_pins, groups,
                        related.aliases, related.static, related.unknown, related.views)


@dataclass
class _Related:
    """What the handlers said about every node: activations' layouts, relations, and the constants
    (static tensors, views of initializers) the relations skip."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    relations: dict[str, Relation] = field(default_factory=dict)
    static: set[str] = field(default_factory=set)
    aliases: dict[str, tuple[str, tuple[int, ...] | None]] = field(default_factory=dict)
    views: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)
    unknown: dict[str, list[str]] = field(default_factory=dict)


def _relate_nodes(model: LoadedModel, nodes: dict[str, onnx.NodeProto]) -> _Related:
    """Each node's relation in graph order; a node computing only constants records which initializer
    its output views instead."""
    graph = model.graph
    consumers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, node in nodes.items():
        for index, tensor in enumerate(node.input):
            if tensor:
                consumers[tensor].append((name, index))
    related = _Related(static={t.name for t in graph.initializer} | set(model.folded))
    tensors, static = related.tensors, related.static
    for value in graph.input:
        if value.name not in static:
            tensors[value.name] = _checked(_graph_input(model, value.name, consumers, nodes, tensors, static), model)
    for name, node in nodes.items():
        handler = handler_for(node.op_type, node.domain)
        inner = outer_references(node)
        inputs = [i for i in node.input if i] + sorted(inner)
        if getattr(handler, "static_output", False) or all(i in static for i in inputs):
            static.update(o for o in node.output if o)
            _record_alias(model, node, related.aliases)
            _record_view(model, name, node, related.views, static)
            continue
        if not is_known(node.op_type, node.domain):
            label = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            related.unknown.setdefault(label, []).append(name)
        view = _view(model, name, node, tensors, static, related.aliases, related.views)
        related.relations[name] = relation = _relate(model, view, handler, inner, tensors)
        for output, axes in zip(view.outputs, relation.output_axes):
            if output is not None:
                tensors[output.name] = _checked(TensorInfo(output.name, output.shape, _valid_axes(axes, output.shape),
                                                           copies=output.name in relation.copies), model)
    return related


def _offsets(model: LoadedModel, tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """Where each activation's channel elements start in the union-find arrays."""
    offsets, total = {}, 0
    for name, info in tensors.items():
        if info.channels:
            offsets[name] = total
            total += info.channels
    if total > MAX_CHANNEL_ELEMENTS:
        raise ModelLoadError(f"{model.source}: {total} channels over all activations, more than the channel graph "
                             f"holds ({MAX_CHANNEL_ELEMENTS})")
    return offsets


class _Pins:
    """Pinned channel elements and why, collected as relations are read."""

    def __init__(self, offsets: dict[str, int], tensors: dict[str, TensorInfo]):
        self.offsets, self.tensors = offsets, tensors
        self.elements: list[np.ndarray] = []
        self.reason_ids: list[np.ndarray] = []
        self.reasons: dict[str, int] = {}

    def add(self, pin: Pin) -> None:
        if pin.tensor not in self.offsets:
            return
        index = np.arange(self.tensors[pin.tensor].channels) if pin.index is None else np.asarray(pin.index)
        self.elements.append(self.offsets[pin.tensor] + index)
        self.reason_ids.append(np.full(index.size, self.reasons.setdefault(pin.reason, len(self.reasons))))

    def by_class(self, class_of: np.ndarray) -> dict[int, list[str]]:
        return _reasons_by_class(class_of, self.elements, self.reason_ids, list(self.reasons))


def _unite(model: LoadedModel, nodes: dict[str, onnx.NodeProto], related: _Related,
           offsets: dict[str, int]) -> tuple[np.ndarray, dict[int, list[str]]]:
    """The channel class of every element (the components of the handlers' ties) and each pinned
    class's reasons: graph inputs and outputs, the handlers' pins, ties whose layout is lost, and
    channel grids that the ties leave without one axis of whole slices."""
    pins = _Pins(offsets, related.tensors)
    for value in model.graph.input:
        pins.add(Pin(value.name, f"graph input '{value.name}'"))
    for value in model.graph.output:
        pins.add(Pin(value.name, f"graph output '{value.name}'"))
    for p in _consumed_copies(nodes, related.tensors, related.relations):
        pins.add(p)
    edges_a, edges_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for name, relation in related.relations.items():
        for p in relation.pins:
            pins.add(p)
        for tie in relation.ties:
            if tie.a not in offsets or tie.b not in offsets:
                lost = f"channel layout is lost at {nodes[name].op_type} node '{name}'"
                for side in (tie.a, tie.b):
                    pins.add(Pin(side, lost))
                continue
            edges_a.append(offsets[tie.a] + tie.a_index)
            edges_b.append(offsets[tie.b] + tie.b_index)
    total = sum(related.tensors[t].channels for t in offsets)
    _, class_of = np.unique(connected_components(total, np.concatenate(edges_a), np.concatenate(edges_b)),
                            return_inverse=True)
    for relation in related.relations.values():
        for grid in relation.grids:
            info = related.tensors.get(grid.tensor)
            if grid.tensor in offsets and sliced_axis(info, class_of[offsets[grid.tensor]:][:info.channels]) is None:
                pins.add(Pin(grid.tensor, grid.reason))
    return class_of.astype(np.int64), pins.by_class(class_of)


def _relate(model: LoadedModel, view: NodeView, handler, inner: set[str], tensors: dict[str, TensorInfo]) -> Relation:
    """The handler's relation for one node; activations its subgraphs read (If/Loop/Scan bodies read
    outer tensors by name) are pinned, since what the body does with those channels is unknown."""
    try:
        relation = handler.relate(view)
    except ModelLoadError as exc:  # the node contradicts itself (weights vs shapes)
        raise ModelLoadError(f"{model.source}: {exc}") from None
    relation.pins += [Pin(t, f"{view.op_type} node '{view.name}' reads it inside a subgraph") for t in sorted(inner)
                      if t in tensors]
    return relation


def outer_references(node: onnx.NodeProto) -> set[str]:
    """Tensors of the enclosing graph that the node's subgraphs (If branches, Loop and Scan bodies) read."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            local.update(o for inner in sub.node for o in inner.output)
            for inner in sub.node:
                names.update(i for i in (*inner.input, *outer_references(inner)) if i and i not in local)
    return names


def _consumed_copies(nodes, tensors: dict[str, TensorInfo], relations: dict[str, Relation]) -> list[Pin]:
    """Channels that are copies of one value may go only where each stays a channel of the reader's
    output (x / ||x||): there the removed channel's output is removed too. A reader that sums them
    (a conv) would lose their contribution, which zeroing the channel in the original does not."""
    pins = []
    for name, node in nodes.items():
        relation = relations.get(name)
        for tensor in set(node.input):
            info = tensors.get(tensor)
            if info is None or not info.copies or relation is None:
                continue
            outputs = set(node.output)
            if not any({tie.a, tie.b} & outputs and tensor in (tie.a, tie.b) for tie in relation.ties):
                pins.append(Pin(tensor, f"{node.op_type} node '{name}' consumes '{tensor}', whose channels are "
                                        "copies of one value"))
    return pins


def _reasons_by_class(class_of, elements, reason_ids, reasons: list[str]) -> dict[int, list[str]]:
    """Each pinned class's reasons, in the order they were first given."""
    if not elements:
        return {}
    classes = class_of[np.concatenate(elements)]
    ids = np.concatenate(reason_ids)
    pairs, first = np.unique(classes * len(reasons) + ids, return_index=True)
    by_class: dict[int, list[str]] = defaultdict(list)
    for pair in pairs[np.argsort(first, kind="stable")].tolist():
        by_class[pair // len(reasons)].append(reasons[pair % len(reasons)])
    return dict(by_class)


def module_path(node: onnx.NodeProto) -> str | None:
    """The module path in a node's `pkg.torch.onnx.name_scopes` metadata (the enclosing modules'
    full paths, outermost first, then the op's own name), or None."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if not isinstance(scopes, list) or len(scopes) < 2:
                return None
            path = str(scopes[-2])
            return path if path and not path.startswith("_") else None
    return None


def node_view(graph: ChannelGraph, name: str) -> NodeView:
    """The view a handler gets of a node of a built graph (surgery's): every constant's value is readable."""
    view = _view(graph.model, name, graph.nodes[name], graph.tensors, graph.static, graph.aliases, graph.views)
    view.constant_of = graph.constant
    return view


def _unique_names(nodes) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for index, node in enumerate(nodes):
        base = node.name or f"{node.op_type}_{index}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base}#{count}")
    return names


def _graph_input(model, name, consumers, nodes, tensors, static) -> TensorInfo:
    """A graph input takes the channel axes read by the nearest consumer that has an opinion,
    searching through rank-preserving ops (a decomposed LayerNorm starts with ReduceMean) and
    transposes (a channels-last input, NHWC, transposed to NCHW ahead of a Conv)."""
    shape = model.shapes.get(name)
    axes = None
    if shape is not None:
        identity = tuple(range(len(shape)))
        frontier, seen = [(name, identity)], set()
        while frontier and axes is None and len(seen) < 32:
            tensor, perm = frontier.pop(0)  # tensor's axis k is the input's axis perm[k]
            here = tuple(shape[p] for p in perm)
            for node_name, index in consumers.get(tensor, []):
                if node_name in seen:
                    continue
                seen.add(node_name)
                node = nodes[node_name]
                handler = handler_for(node.op_type, node.domain)
                view = _view(model, node_name, node, {**tensors, tensor: TensorInfo(tensor, here)}, static)
                axes = handler.preferred_axes(view, index, len(here))
                if axes is not None:
                    axes = tuple(perm[a] for a in axes if a < len(perm))
                    break
                moved = handler.view_permutation(node, len(here)) if index == 0 else None
                if moved is not None and node.output and node.output[0] and len(moved) == len(perm):
                    frontier.append((node.output[0], tuple(perm[m] for m in moved)))
                frontier.extend((o, perm) for o in node.output if o and model.shapes.get(o, ()) == here)
        if axes is None and len(shape) >= 2:
            axes = (1,)
    return TensorInfo(name, shape, _valid_axes(axes, shape))


def _view(model: LoadedModel, name: str, node: onnx.NodeProto, tensors: dict[str, TensorInfo], static: set[str],
          aliases: dict | None = None, views: dict | None = None) -> NodeView:
    def info(tensor: str) -> TensorInfo | None:
        if not tensor:
            return None
        if tensor in static:
            alias = tensor in (aliases or {})
            computed = not model.is_constant(tensor) and not alias
            sliceable = tuple(sorted((views or {}).get(tensor, {}))) if computed else ()
            return TensorInfo(tensor, model.shapes.get(tensor), None, constant=True, computed=computed,
                              sliceable=sliceable, stored=alias or model.initializer(tensor) is not None,
                              from_shape=tensor in model.shape_derived)
        return tensors.get(tensor) or TensorInfo(tensor, model.shapes.get(tensor))

    outputs = [TensorInfo(o, model.shapes.get(o)) if o else None for o in node.output]
    return NodeView(node, name, [info(i) for i in node.input], outputs,
                    lambda tensor: resolved_constant(model, aliases or {}, tensor), model.opset)


def param_root(model: LoadedModel, aliases: dict, name: str) -> tuple[str, tuple[int, ...] | None] | None:
    """The initializer behind a constant input (itself, or the one an alias views) and the permutation applied."""
    if model.initializer(name) is not None:
        return name, None
    return aliases.get(name)


def resolved_constant(model: LoadedModel, aliases: dict, name: str) -> np.ndarray | None:
    """`model.constant(name)`, else the aliased initializer's value with the alias's permutation."""
    value = model.constant(name)
    root = aliases.get(name)
    if value is None and root is not None:
        value = model.constant(root[0])
        if value is not None and root[1] is not None:
            value = np.transpose(value, root[1])
    return value


def _checked(info: TensorInfo, model: LoadedModel) -> TensorInfo:
    """The tensor, unless it has more channels than the channel graph can hold."""
    if info.channels is not None and info.channels > MAX_CHANNELS:
        raise ModelLoadError(f"{model.source}: tensor '{info.name}' has {info.channels} channels (shape {list(info.shape)}), "
                             f"more than the channel graph holds ({MAX_CHANNELS})")
    return info


def _valid_axes(axes, shape) -> tuple[int, ...] | None:
    if axes is None or shape is None or not axes:
        return None
    if any(a < 0 or a >= len(shape) for a in axes) or math.prod(shape[a] for a in axes) == 0:
        return None
    return tuple(axes)


def _record_alias(model: LoadedModel, node: onnx.NodeProto, aliases) -> None:
    """Weights reach MatMul through Transpose (or Identity) when exported without constant folding;
    remember which initializer such a static tensor views, and through which axis permutation."""
    if not node.input or not node.input[0] or not node.output:
        return
    source = node.input[0]
    root = (source, None) if model.initializer(source) is not None else aliases.get(source)
    if root is None:
        return
    rank = len(model.shapes.get(source, ()))
    perm = handler_for(node.op_type, node.domain).view_permutation(node, rank)
    if perm is None:
        return
    if root[1] is not None:
        perm = tuple(root[1][p] for p in perm)
    aliases[node.output[0]] = (root[0], None if perm == tuple(range(rank)) else perm)


def _record_view(model: LoadedModel, name: str, node: onnx.NodeProto, views: dict, static: set[str]) -> None:
    """A constant laid out again from an initializer (a relative position bias gathered from its table,
    reshaped, transposed): which of its axes are which initializer axes, so surgery can slice the table."""
    if not node.output or not node.output[0] or not any(model.initializer(i) is not None or i in views
                                                        for i in node.input if i):
        return
    shape = model.shapes.get(node.output[0])
    handler = handler_for(node.op_type, node.domain)
    # A dequantized weight maps its axes one to one, at no cost: an LLM's int8 weights stay int8.
    if shape is None or (math.prod(shape) > _MAX_VIEW_ELEMENTS and not handler.stored_as_input):
        return
    view = None
    mapped = {}
    for axis in range(len(shape)):
        if shape[axis] <= 1:
            continue
        view = view or _view(model, name, node, {}, static)
        found = handler.source_axis(view, axis)
        if found is None or found[0] >= len(node.input):
            continue
        source, source_axis = node.input[found[0]], found[1]
        if model.initializer(source) is not None:
            mapped[axis] = (source, source_axis)
        elif source_axis in views.get(source, {}):
            mapped[axis] = views[source][source_axis]
    if mapped:
        views[node.output[0]] = mapped


def connected_components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest element of each element's component, for the undirected edges (a[k], b[k]).

    Vectorized union-find: hook every edge's larger root onto the smaller, then jump pointers
    until every element points at its root; a few rounds suffice even for long chains.
    """
    label = np.arange(count, dtype=np.int64)
    a, b = a.astype(np.int64), b.astype(np.int64)
    while True:
        la, lb = label[a], label[b]
        differ = la != lb
        if not differ.any():
            return label
        la, lb = la[differ], lb[differ]
        np.minimum.at(label, np.maximum(la, lb), np.minimum(la, lb))
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped


def _networkx(model: LoadedModel, nodes, tensors):
    import networkx as nx

    graph = nx.MultiDiGraph()
    consumers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, node in nodes.items():
        for index, tensor in enumerate(node.input):
            if tensor:
                consumers[tensor].append((name, index))
    producer = {}
    for name, node in nodes.items():
        graph.add_node(name, kind="op", op_type=node.op_type)
        for output in node.output:
            if output:
                producer[output] = name
    for value in model.graph.input:
        if value.name in tensors:
            graph.add_node(f"input:{value.name}", kind="input")
            producer[value.name] = f"input:{value.name}"
    for value in model.graph.output:
        graph.add_node(f"output:{value.name}", kind="output")
    outputs = {v.name for v in model.graph.output}
    for tensor, source in producer.items():
        info = tensors.get(tensor)
        attrs = dict(tensor=tensor, shape=info.shape if info else model.shapes.get(tensor),
                     channel_axes=info.axes if info else None)
        for consumer, _ in consumers.get(tensor, []):
            graph.add_edge(source, consumer, key=tensor, **attrs)
        if tensor in outputs:
            graph.add_edge(source, f"output:{tensor}", key=tensor, **attrs)
    return graph
