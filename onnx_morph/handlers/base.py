"""What a handler sees of a node, and the relation it states about the node's channels.

A tensor's channels are the elements of its channel axes, flattened in the order the axes are
listed: (1,) for an NCHW activation, (2, 1) after a channel shuffle's transpose. Handlers relate
these elements between a node's inputs and outputs; the channel graph unites them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import onnx

Axes = tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of a node: static shape, channel axes, and whether its value is constant
    (`computed`: a constant computed by nodes at run time, which surgery cannot slice except along
    `sliceable`, the axes it re-lays out from one initializer's axes; `stored`: an initializer or a
    view of one, which training can change, unlike a Constant node). `copies`: its channels are
    copies of one value (a norm broadcast back over the channels), so zeroing a removed one is not
    what removing it means (x / ||x|| would divide by zero)."""

    name: str
    shape: tuple[int, ...] | None
    axes: Axes | None = None
    constant: bool = False
    computed: bool = False
    sliceable: Axes = ()  # axes of a computed constant that surgery slices at its initializer (a table's head axis)
    stored: bool = False
    copies: bool = False
    from_shape: bool = False  # a constant folded from activations' shapes (a reshape target built from x.size())

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def channels(self) -> int | None:
        if self.shape is None or self.axes is None:
            return None
        return math.prod(self.shape[a] for a in self.axes)

    @property
    def is_activation(self) -> bool:
        return not self.constant


@dataclass
class NodeView:
    """A node together with its tensors, as handed to a handler."""

    node: onnx.NodeProto
    name: str
    inputs: list[TensorInfo | None]
    outputs: list[TensorInfo | None]
    constant_of: Callable[[str], np.ndarray | None]
    opset: int

    @property
    def op_type(self) -> str:
        return self.node.op_type

    def attr(self, name: str, default=None):
        for attribute in self.node.attribute:
            if attribute.name == name:
                return onnx.helper.get_attribute_value(attribute)
        return default

    def input(self, index: int) -> TensorInfo | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def const(self, index: int) -> np.ndarray | None:
        info = self.input(index)
        return None if info is None or not info.constant else self.constant_of(info.name)

    def activations(self) -> list[TensorInfo]:
        return [t for t in self.inputs if t is not None and t.is_activation]


@dataclass(frozen=True)
class Tie:
    """Element a[k] of tensor `a` and element b[k] of tensor `b` live or die together, for every k."""

    a: str
    a_index: np.ndarray
    b: str
    b_index: np.ndarray


@dataclass(frozen=True)
class Pin:
    """Channels of `tensor` that must not shrink (all of them when `index` is None), and why."""

    tensor: str
    reason: str
    index: np.ndarray | None = None


@dataclass(frozen=True)
class Grid:
    """The channels of `tensor` span several axes (attention heads x head dims, a channel shuffle's
    groups x members): a reshape can only shrink such a grid by whole slices along one of its axes.

    The channel graph keeps it prunable when, after all ties, every class is made of whole slices
    along one axis (whole heads), and pins it with `reason` otherwise.
    """

    tensor: str
    reason: str


@dataclass(frozen=True)
class Source:
    """A parameter slice carrying a per-channel penalty for channels of `tensor`.

    kind is "gamma" (a normalization scale) or "weight" (a producer's weight slice). Channel i of
    `tensor` owns slice i of `param` along `axis`.
    """

    kind: str
    tensor: str
    node: str
    param: str
    axis: int = 0


@dataclass(frozen=True)
class OpGeometry:
    """The bilinear shape of an op whose cost grows with alive input times alive output channels.

    FLOPs = 2 * (positions * kernel * sum over groups of (alive inputs * alive outputs) + fixed_macs),
    fixed_macs being work on channels that never shrink (an LSTM's recurrent products).
    """

    input: str
    in_axis: int
    output: str
    out_axis: int
    kernel: int
    positions: int
    groups: int = 1
    weight: str | None = None
    second_input: str | None = None  # the right operand of a product of two activations
    fixed_macs: int = 0


@dataclass(frozen=True)
class ParamTerm:
    """A parameter of the op; with `tensor` set, its size scales with that tensor's alive channels."""

    param: str
    size: int
    tensor: str | None = None


@dataclass
class Relation:
    """Everything a handler states about one node."""

    output_axes: list[Axes | None]
    ties: list[Tie] = field(default_factory=list)
    pins: list[Pin] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    geometry: OpGeometry | None = None
    params: list[ParamTerm] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)
    # The output is a product of its tied inputs (Mul, attention's matrix products): a channel that
    # is zero in one operand is zero in the output, whatever the other operands hold.
    product: bool = False
    copies: list[str] = field(default_factory=list)  # outputs whose channels are copies of one value


class Editor(Protocol):
    """What surgery lets a handler change on its node."""

    def keep(self, tensor: str) -> np.ndarray | None:
        """How many copies of each of the tensor's channel elements remain: 0 or 1 when pruning,
        more when expanding; None when every element stays once."""

    def slice_input(self, index: int, axis: int, copies: np.ndarray) -> None:
        """Repeat each entry of constant input `index` along `axis` copies[i] times (0 drops it)."""

    def set_input(self, index: int, value: np.ndarray) -> None:
        """Replace (or add) constant input `index`."""

    def current(self, index: int) -> np.ndarray:
        """Constant input `index` as surgery has changed it so far."""

    def set_attr(self, name: str, value) -> None:
        """Set an attribute; None removes it."""

    def set_entries(self, index: int, values: dict[int, int]) -> bool:
        """Set entries of a shape input computed at run time (x.size() pieces joined to constants) where
        they come from, a constant piece, so that the rest still follows the input; False, changing
        nothing, when some entry cannot be traced to a constant feeding only this input."""

    def removed_values(self, tensor: str) -> np.ndarray | None:
        """Per channel element, the constant a removed channel holds (0 where kept); None if all zero."""

    def folded(self, tensor: str) -> None:
        """Record that this node absorbed the removed channels' constants of `tensor` into its bias."""


class Handler(Protocol):
    """The meaning of one op family; the registry maps op types to handlers."""

    def relate(self, view: NodeView) -> Relation: ...

    def preferred_axes(self, view: NodeView, index: int, rank: int) -> Axes | None:
        """Channel axes this op reads from input `index`; a graph input takes them from its consumer."""
        ...

    def prune(self, view: NodeView, edit: Editor) -> None:
        """Resize the node's parameters and shape constants to the kept channels of its tensors."""
        ...

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        """Fresh values for the node's trained constant inputs, by input index, as a new layer of
        this kind starts training; inputs left out keep their values."""
        ...

    def varying(self, view: NodeView, relation: Relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
        """Which channel elements of each output may change with the model's inputs, given which
        elements of each input may (None for a constant input); True or False stands for a whole output."""
        ...

    def index_bound(self, view: NodeView, index: int) -> int | None:
        """When input `index` holds indices into a table (an embedding lookup), the table's length."""
        ...


@dataclass
class Replacement:
    """Nodes standing for one node in a form the handlers know, and the initializers they add."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto] = field(default_factory=list)


class BaseHandler:
    """The defaults of every hook: an op without parameters that mixes nothing and needs no rewriting.

    Subclasses state the channel relation (`relate`) and, where the op has parameters or shape
    constants, how surgery resizes them (`prune`). The other hooks are how the rest of the package
    asks about an op instead of switching on its type:

    - loading: `normalize` rewrites an exporter idiom into ops the handlers know, before anything
      else reads the model (SequenceAt of a SplitToSequence becomes a Slice); `fold` computes outputs
      from shapes or types alone (Shape, CastLike), `constant_output` reads a value held in attributes
      (Constant), `evaluate` computes outputs the reference runtime cannot; `foldable = False` keeps
      folding away from random draws; `reads_shape` marks values that are constants only at the
      analyzed shapes; `output_shapes` gives shapes onnx cannot infer.
    - training: `no_gradient` refuses a model holding an op onnxruntime-training cannot
      differentiate, with a hint (see `without_gradient`); `to_training` rewrites a node into the form
      the gradient builder accepts (BatchNorm on batch statistics, LayerNorm with all its outputs,
      Sum as Adds) and `to_eval` turns the training form back for the eval graph;
      `running_statistics` names the inputs that calibration re-measures on data.
    - costs and surgery: `initial_values`, `batch_free`, `view_permutation`, `source_axis`,
      `slice_view`, `store_value`, `entry_source`, `resize_view`, `zero_of`, `index_bound`, `varying`.
    """

    static_output = False
    # Each output channel element is computed from the input elements tied to it (and from inputs
    # tied to nothing of that output, such as a broadcast operand): dependence follows the ties.
    follows_ties = False
    # Output 0 holds input 0's values, reshaped or cast: an index bound read after it holds before it.
    preserves_values = False
    # Inputs that may carry trained parameters when the node computes a constant (a weight normalized at
    # load time, a gathered position table); None: all of them. Data and statistics inputs are left out.
    parameter_inputs: tuple[int, ...] | None = None
    # Output 0 holds input 0's values at another precision (DequantizeLinear): memory is counted
    # at input 0's type, and a weight behind it is a parameter stored at that type.
    stored_as_input = False
    # Input 0 is written out at output 0's precision (QuantizeLinear): its producer's write counts so.
    stored_as_output = False
    # onnxruntime-training has no gradient for the op: training refuses a model holding it, with this
    # hint of what to export instead (see without_gradient). None: the op trains.
    no_gradient: str | None = None
    # The inputs holding running statistics (mean, variance) of input 0's channels on axis 1, which
    # calibration re-measures on data (BatchNormalization: 3 and 4); None: the op keeps none.
    running_statistics: tuple[int, int] | None = None
    # Load-time folding may compute the outputs of constant inputs (False: the op draws random numbers).
    foldable = True
    # The outputs are computed from an input's shape alone (Shape, Size): constants only at the
    # analyzed input shapes, so surgery writes them in a form that still follows other shapes.
    reads_shape = False

    def preferred_axes(self, view: NodeView, index: int, rank: int) -> Axes | None:
        return None

    def prune(self, view: NodeView, edit: Editor) -> None:
        """Ops without parameters or shape constants follow their inputs' shapes."""

    def initial_values(self, view: NodeView, rng: np.random.Generator) -> dict[int, np.ndarray]:
        return {}

    def output_shapes(self, node: onnx.NodeProto, inputs: list[tuple[int, ...] | None]) -> list | None:
        """Output shapes onnx's shape inference cannot give (ops of other domains), from the input
        shapes; None when the handler does not know them either."""
        return None

    def zero_of(self, view: NodeView) -> str | None:
        """For an op writing quantized integers, the constant input holding output 0's zero point (a
        removed channel holds it where a float channel holds 0); None when zero is 0."""
        return None

    def evaluate(self, node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
        """The outputs of the node on constant inputs, where the handler computes them itself; None
        leaves it to onnx's reference runtime."""
        return None

    def fold(self, node: onnx.NodeProto, values: list[np.ndarray | None], shapes: list[tuple[int, ...] | None],
             dtypes: list[int | None]) -> list[np.ndarray] | None:
        """Outputs the loader computes from what it knows of the inputs (their constant values, static
        shapes and element types, by input index; None where unknown) before every input is a
        constant: a Shape from its input's shape. None leaves folding to `evaluate` and onnx's
        reference runtime, once every input is a constant."""
        return None

    def constant_output(self, node: onnx.NodeProto) -> np.ndarray | None:
        """Output 0's value when the node holds it in its attributes (Constant); None otherwise."""
        return None

    def normalize(self, node: onnx.NodeProto, producer: Callable[[str], onnx.NodeProto | None],
                  constant: Callable[[str], np.ndarray | None]) -> Replacement | None:
        """The node rewritten, as the model is loaded, into ops the handlers know (an exporter's idiom),
        given the node producing a tensor and a tensor's constant value (None when computed at run
        time); None keeps the node. Nodes whose outputs nothing reads after the rewrite are dropped."""
        return None

    def to_training(self, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto]:
        """The nodes computing `node` in the training graph, where onnxruntime-training's gradient builder
        needs another form; `node` belongs to the training copy and may be changed, `fresh(name)` names
        new tensors. Default: the node as it is."""
        return [node]

    def to_eval(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """The eval graph's form of a node that `to_training` changed (the eval model onnxruntime-training
        derives from the training graph). Default: the node as it is."""
        return [node]

    def batch_free(self, view: NodeView, batch: int) -> dict[int, np.ndarray]:
        """New values for constant inputs that froze the export's batch size `batch` (the batch is
        axis 0 of every data input), so that the node runs at any batch; most ops need none."""
        return {}

    def view_permutation(self, node: onnx.NodeProto, rank: int) -> tuple[int, ...] | None:
        """If the op's output is its first input with axes permuted (a view of a weight), the permutation."""
        return None

    def varying(self, view: NodeView, relation: Relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
        """Without a finer rule every output element may change as soon as any input element may.
        A relation with pins is not followed: its ties need not say what is computed from what."""
        if self.follows_ties and not relation.pins:
            return varying_along_ties(view, relation, inputs)
        anything = any(bool(v.any()) for v in inputs if v is not None)
        return [anything] * len(view.outputs)

    def index_bound(self, view: NodeView, index: int) -> int | None:
        return None

    def source_axis(self, view: NodeView, axis: int) -> tuple[int, int] | None:
        """If output axis `axis` is an axis of one input laid out again, entries in the same order (a
        table gathered, reshaped, transposed): (that input's index, its axis). Slicing the input
        there slices the output along `axis`."""
        return None

    def slice_view(self, view: NodeView, edit: Editor, axis: int, copies: np.ndarray) -> None:
        """Surgery sliced the initializer this op's output is laid out from (see source_axis) so that
        output axis `axis` keeps `copies`: update shape constants (resize_view) and per-slice
        parameters of the op's own (a per-channel scale)."""
        self.resize_view(view, edit, axis, int(copies.sum()))

    def store_value(self, view: NodeView, edit: Editor, value: np.ndarray) -> bool:
        """Make output 0, a parameter laid out from input 0 (see source_axis), hold `value` by changing
        input 0 (a dequantized bias: its integers); False when the op cannot."""
        return False

    def entry_source(self, view: NodeView, position: int) -> tuple[int, int] | None:
        """If entry `position` of the flattened output is an entry of one input, unchanged (a shape
        computation's Concat, Unsqueeze, Cast): (that input's index, the entry's flat position)."""
        return None

    def resize_view(self, view: NodeView, edit: Editor, axis: int, count: int) -> None:
        """Its input was sliced so that output axis `axis` (see source_axis) now holds `count` entries:
        update the shape constants that name that extent."""


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


def without_gradient(handler: BaseHandler, hint: str) -> BaseHandler:
    """A copy of `handler` for an op that onnxruntime-training cannot differentiate (see
    BaseHandler.no_gradient); `hint` says what to export instead."""
    refused = copy.copy(handler)
    refused.no_gradient = hint
    return refused


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or replace) one attribute of a node, in place."""
    for attribute in node.attribute:
        if attribute.name == name:
            node.attribute.remove(attribute)
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def varying_through_weight(inputs: list[np.ndarray | None], reads: np.ndarray) -> list[np.ndarray | bool] | None:
    """Output channel o of a weighted op (input 0 times a constant weight, `reads[o, i]`: some weight
    from input channel i to o is nonzero) may vary only when it reads a channel that may: a channel
    whose weights are all zero holds its bias. None when another input may vary, or `reads` does not
    match input 0's channels."""
    x = inputs[0]
    if x is None or x.size != reads.shape[1] or any(v is not None and v.any() for v in inputs[1:]):
        return None
    return [np.any(reads[:, x], axis=1)]


def varying_along_ties(view: NodeView, relation: Relation, inputs: list[np.ndarray | None]) -> list[np.ndarray | bool]:
    """An output element may vary when an input element tied to it may, or when an input tied to
    nothing of that output may vary anywhere (a broadcast operand reaches every element). The
    view's tensors carry their channel axes (as the built graph has them)."""
    result: list[np.ndarray | bool] = []
    for y in view.outputs:
        if y is None or y.channels is None:
            result.append(any(bool(v.any()) for v in inputs if v is not None))
            continue
        out = np.zeros(y.channels, dtype=bool)
        for x, v in zip(view.inputs, inputs):
            if x is None or v is None:
                continue
            tied = [(t.a_index, t.b_index) if t.a == x.name else (t.b_index, t.a_index)
                    for t in relation.ties if {t.a, t.b} == {x.name, y.name}]
            if not tied:
                out |= bool(v.any())
            for x_index, y_index in tied:
                np.logical_or.at(out, y_index, v[x_index] if x.channels is not None else bool(v.any()))
        result.append(out)
    return result


def identity_tie(a: TensorInfo, b: TensorInfo) -> Tie:
    count = a.channels
    index = np.arange(count, dtype=np.int64)
    return Tie(a.name, index, b.name, index)


def grid_index(info: TensorInfo) -> np.ndarray:
    """Each channel element's index, laid out over the channel axes in the order they are listed."""
    return np.arange(info.channels, dtype=np.int64).reshape([info.shape[a] for a in info.axes])


def sub_grid_index(info: TensorInfo, axes: Axes) -> np.ndarray:
    """For each channel element of `info` (grid_index layout), its element in a tensor whose channel
    axes are the subset `axes` of info's (same extents): the element it projects to."""
    coords = np.indices([info.shape[a] for a in info.axes])
    return np.ravel_multi_index([coords[info.axes.index(a)] for a in axes], [info.shape[a] for a in axes])


def pin_all(view: NodeView, reason: str) -> list[Pin]:
    """Pins every activation the node touches."""
    tensors = [*view.activations(), *(t for t in view.outputs if t is not None)]
    return [Pin(t.name, reason) for t in tensors]


def channel_ids(info: TensorInfo) -> np.ndarray:
    """An array broadcastable to `info.shape` holding each position's channel element index."""
    dims = [info.shape[a] for a in info.axes]
    ids = np.arange(math.prod(dims), dtype=np.int64).reshape(dims)
    order = sorted(range(len(info.axes)), key=lambda k: info.axes[k])
    ids = ids.transpose(order)
    view_shape = [1] * len(info.shape)
    for a in info.axes:
        view_shape[a] = info.shape[a]
    return ids.reshape(view_shape)


def slice_members(info: TensorInfo, axis: int) -> np.ndarray:
    """The channel elements of each slice of the tensor's channel grid along `axis`, one row per slice."""
    dims = [info.shape[a] for a in info.axes]
    ids = np.arange(math.prod(dims), dtype=np.int64).reshape(dims)
    return np.moveaxis(ids, info.axes.index(axis), 0).reshape(dims[info.axes.index(axis)], -1)


def spread_over_positions(info: TensorInfo, axis: int) -> bool:
    """The channels span `axis` and axes after it that an op reading channels on `axis` treats as
    positions: a Linear's features reshaped to [N, C, H, W] ahead of a Conv."""
    return info.axes is not None and len(info.axes) > 1 and axis in info.axes and min(info.axes) == axis


def collapse_tie(info: TensorInfo, axis: int) -> Tie:
    """Every element of a channel grid lives or dies with its slice along `axis`: an op that reads
    channels on `axis` sees the grid's other axes as positions, so channel c owns the whole slice c."""
    rows = slice_members(info, axis)
    return Tie(info.name, rows.reshape(-1), info.name, np.repeat(rows[:, 0], rows.shape[1]))


def along_axis(info: TensorInfo, values: np.ndarray | None, axis: int) -> np.ndarray | None:
    """Per-element values (a keep mask) of a tensor as one value per slice along `axis`, for a tensor
    whose slices along `axis` are whole channels (see collapse_tie)."""
    if values is None or info.axes is None or info.axes == (axis,):
        return values
    return values[slice_members(info, axis)[:, 0]]


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def param_count(view: NodeView, index: int) -> int:
    info = view.input(index)
    if info is None or info.shape is None:
        return 0
    return math.prod(info.shape)


def param_dtype(view: NodeView, index: int) -> np.dtype:
    """The dtype of a constant input; float32 when it is a view (a Transpose of a weight) surgery resolves."""
    value = view.const(index)
    return value.dtype if value is not None else np.dtype(np.float32)


def uniform_init(shape: tuple[int, ...], fan_in: int, rng: np.random.Generator, dtype) -> np.ndarray:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default for Conv and Linear weights and biases."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def fresh_weight_and_bias(view: NodeView, fan_in: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """A new Conv or Linear layer: weight (input 1) and bias (input 2, if any) uniform in +-1/sqrt(fan_in)."""
    dtype = param_dtype(view, 1)
    values = {1: uniform_init(view.input(1).shape, fan_in, rng, dtype)}
    bias = view.input(2)
    if bias is not None and bias.constant and bias.shape is not None:
        values[2] = uniform_init(bias.shape, fan_in, rng, dtype)
    return values


def has_channels(x: TensorInfo | None) -> bool:
    """Whether `x` carries activation channels to relate: present, with channel axes, not a constant."""
    return x is not None and x.axes is not None and not x.constant


def describe(view: NodeView) -> str:
    return f"{view.op_type} node '{view.name}'"
