"""Loading and validating an ONNX model, and inferring every tensor's shape on a weightless view.

Shape inference never sees the weights: large initializers are replaced by graph inputs of the
same name and type, so checking and inferring cost memory proportional to the graph, not to
the model file.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from onnx_morph.errors import ModelLoadError, OptionError
from onnx_morph.graph.normalize import normalized
from onnx_morph.graph.wire import read_without_weights, with_data
from onnx_morph.handlers import handler_for, is_known

MIN_OPSET = 11
MAX_OPSET = 21
# Initializers at most this large stay in the weightless view: shape constants need their values.
_SMALL_INITIALIZER = 1024
PROTOBUF_LIMIT = 2**31 - 1
# onnxruntime defines ops in the default domain that onnx does not (SimplifiedLayerNormalization, written
# by its layer-norm fusion): onnx's checker and shape inference see them in this domain, which they skip.
RUNTIME_DOMAIN = "onnx_morph.runtime_ops"
# A tensor of more elements than this (4 TiB of float32) exists on no machine: its dims are hostile or wrong.
MAX_ELEMENTS = 2**40


@dataclass
class LoadedModel:
    """A validated model plus the static shape and element type of every tensor."""

    model: onnx.ModelProto
    source: str
    base_dir: Path | None
    opset: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, int]
    input_shapes: dict[str, tuple[int, ...]]
    notes: list[str] = field(default_factory=list)
    folded: dict[str, np.ndarray] = field(default_factory=dict)
    # Folded values computed from activations' shapes (Shape -> Gather -> Concat): constants only at the
    # analyzed input shapes, so surgery writes them in a form that still follows other shapes.
    shape_derived: set[str] = field(default_factory=set)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def initializer(self, name: str) -> TensorProto | None:
        return self._initializers.get(name)

    def __post_init__(self) -> None:
        self._initializers = {t.name: t for t in self.model.graph.initializer}
        self._computed: dict[str, np.ndarray | None] = {}
        self._constants: dict[str, np.ndarray] = {}
        self._files: dict[Path, memoryview] = {}  # external data files, mapped once
        for node in self.model.graph.node:
            value = handler_for(node.op_type, node.domain).constant_output(node)
            if value is not None:
                self._constants[node.output[0]] = value

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, or None if `name` is computed at run time."""
        if name in self._constants:
            return self._constants[name]
        if name in self.folded:
            return self.folded[name]
        tensor = self._initializers.get(name)
        if tensor is None:
            return None
        if tensor.data_location == TensorProto.EXTERNAL:
            return self._external_array(tensor)
        return numpy_helper.to_array(tensor)

    def _external_array(self, tensor: TensorProto) -> np.ndarray:
        """What numpy_helper.to_array gives for an external initializer (read-only, as there), as a
        view of its file mapped once: no copy per read (surgery and the probes read each weight)."""
        dtype = _PLAIN_TYPES.get(tensor.data_type)
        count = math.prod(tensor.dims)
        if dtype is None or count == 0 or sys.byteorder != "little":
            return numpy_helper.to_array(_with_external_data(tensor, self.base_dir, self.source))
        path, offset, _ = _external_file(tensor, self.base_dir, self.source)
        check_fits(self.source, _data_bytes(tensor), f"the values of initializer '{tensor.name}'")
        return np.frombuffer(self._mapped(path), dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))

    def _view(self, tensor: TensorProto) -> memoryview:
        path, offset, length = _external_file(tensor, self.base_dir, self.source)
        return self._mapped(path)[offset:None if length is None else offset + length]

    def _mapped(self, path: Path) -> memoryview:
        if path not in self._files:
            self._files[path] = _mapped(path)
        return self._files[path]

    def computed_constant(self, name: str) -> np.ndarray | None:
        """The value of a tensor that nodes compute from constants alone and that loading left
        unevaluated because it reads an initializer over the weightless view's limit (a standardized
        weight: weight -> Reshape -> BatchNormalization -> Reshape, times a gain); None when it
        depends on a graph input or the reference runtime cannot compute it."""
        if name not in self._computed:
            self._computed[name] = self._evaluate_constant(name)
        return self._computed[name]

    def _evaluate_constant(self, name: str) -> np.ndarray | None:
        producers = {o: (i, n) for i, n in enumerate(self.graph.node) for o in n.output if o}
        chosen: dict[int, onnx.NodeProto] = {}
        feeds: dict[str, np.ndarray] = {}
        stack, seen = [name], set()
        while stack:
            tensor = stack.pop()
            if not tensor or tensor in seen:
                continue
            seen.add(tensor)
            if tensor in self._initializers:
                feeds[tensor] = self.constant(tensor)
            elif tensor in producers and producers[tensor][1].domain in ("", "ai.onnx"):
                index, node = producers[tensor]
                chosen[index] = node
                stack.extend(node.input)
            else:
                return None
        try:
            for index in sorted(chosen):
                node = chosen[index]
                values = _run_node(node, {i: feeds[i] for i in node.input if i}, self.model.opset_import)
                feeds.update((o, np.asarray(v)) for o, v in zip(node.output, values) if o)
            return feeds[name]
        except Exception:  # noqa: BLE001 - an op the reference runtime cannot run: the value stays unknown
            return None

    def materialized(self, model: onnx.ModelProto | None = None,
                     arrays: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """A copy of the model, or of `model` derived from it, with every weight in memory; `arrays`
        holds the data of `model`'s placeholder initializers (Surgery.arrays)."""
        model = self.model if model is None else model
        external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        check_fits(self.source, serialized_size(model) + sum(_data_bytes(t) for t in external), "the weights")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for tensor in copy.graph.initializer if arrays else ():
            if tensor.name in arrays and tensor.data_location == TensorProto.EXTERNAL:
                tensor.ClearField("data_location")  # as numpy_helper.from_array leaves it
                tensor.raw_data = arrays[tensor.name].tobytes()
        if self.base_dir is not None and external:
            load_external_data_for_model(copy, str(self.base_dir))
        return copy

    def encoded(self, model: onnx.ModelProto | None = None, appendix: bytes = b"",
                arrays: dict[str, np.ndarray] | None = None) -> bytes | None:
        """The protobuf bytes of this model, or of `model` derived from it (its weights still this
        model's external references, its placeholders' data in `arrays`), with every weight in, then
        `appendix`: what materialized() then serialized() give, without decoding and encoding the
        weights. None past protobuf's 2 GB limit."""
        parts = self.encoded_parts(model, appendix, arrays)
        return None if parts is None else b"".join(parts)

    def encoded_parts(self, model: onnx.ModelProto | None = None, appendix: bytes = b"",
                      arrays: dict[str, np.ndarray] | None = None) -> list | None:
        """`encoded` as pieces to join or write in turn: the weights are views of their files or
        arrays (wire.with_data), copied only to where the pieces go."""
        model, arrays = self.model if model is None else model, arrays or {}
        external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        if not external or _external_elsewhere(model.graph):
            data = serialized(self.materialized(model, arrays) if external or _external_elsewhere(model.graph)
                              else model)
            return None if data is None else [data, appendix]
        views = [(memoryview(arrays[t.name]).cast("B"), False) if t.name in arrays else (self._view(t), True)
                 for t in external]
        parts = with_data(model, iter(views), appendix)  # views still: nothing is copied yet
        size = sum(len(part) for part in parts)
        check_fits(self.source, size, "the weights")
        return None if size > PROTOBUF_LIMIT else parts

    def is_constant(self, name: str) -> bool:
        return name in self._initializers or name in self._constants or name in self.folded


def load_model(
    source: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> LoadedModel:
    """Read, validate and shape-infer a model; every failure raises ModelLoadError naming the cause."""
    if isinstance(source, onnx.ModelProto):
        model, label, base_dir = source, "<model>", None
    else:
        path = Path(source)
        model, label, base_dir = _read(path), str(path), path.resolve().parent
    model = normalized(model)
    opset = _check_opset(model, label)
    _check_initializers(model, label, base_dir)
    view, resolved_inputs, notes = _weightless_view(model, label, input_shapes or {})
    _runtime_ops_aside(view)
    try:
        onnx.checker.check_model(view)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{label}: the ONNX checker rejects the model: {_first_line(exc)}") from None
    inferred, folded = _infer_and_fold(view, label)
    shapes, dtypes = _collect_types(inferred)
    _check_sizes(shapes, label)
    return LoadedModel(model, label, base_dir, opset, shapes, dtypes, resolved_inputs, notes, folded,
                       _shape_derived(model.graph, folded))


# Element types whose raw data numpy reads as it is (to_array's frombuffer), by ONNX data type.
_PLAIN_TYPES = {getattr(TensorProto, name): np.dtype(dtype) for name, dtype in (
    ("FLOAT", "float32"), ("DOUBLE", "float64"), ("FLOAT16", "float16"), ("BOOL", "bool"),
    ("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"), ("INT64", "int64"),
    ("UINT8", "uint8"), ("UINT16", "uint16"), ("UINT32", "uint32"), ("UINT64", "uint64"))}


def _mapped(path: Path) -> memoryview:
    """The file's bytes, mapped read-only (an empty file has nothing to map)."""
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b"")


def _external_elsewhere(graph: onnx.GraphProto, top: bool = True) -> bool:
    """Whether a tensor other than the graph's own initializers (a node attribute's, a subgraph's)
    keeps its data in a file."""
    if not top and any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer):
        return True
    for node in graph.node:
        for attr in node.attribute:
            tensors = [attr.t, *attr.tensors] if attr.HasField("t") else attr.tensors
            if any(t.data_location == TensorProto.EXTERNAL for t in tensors):
                return True
            graphs = [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs
            if any(_external_elsewhere(g, top=False) for g in graphs):
                return True
    return False


def _shape_derived(graph: onnx.GraphProto, folded: dict[str, np.ndarray]) -> set[str]:
    """The folded outputs of Shape and Size, and of every folded computation that reads one."""
    derived: set[str] = set()
    for node in graph.node:
        if handler_for(node.op_type, node.domain).reads_shape or any(name in derived for name in node.input):
            derived.update(name for name in node.output if name in folded)
    return derived


def _runtime_op(node: onnx.NodeProto) -> bool:
    """A default-domain op onnx does not define but a handler knows (an onnxruntime op)."""
    return node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type) and is_known(node.op_type)


def _runtime_ops_aside(model: onnx.ModelProto) -> bool:
    """Move the model's runtime ops (see RUNTIME_DOMAIN) to that domain, in place; whether there were any."""
    moved = False
    for node in model.graph.node:
        if _runtime_op(node):
            node.domain = RUNTIME_DOMAIN
            moved = True
    if moved and all(o.domain != RUNTIME_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(RUNTIME_DOMAIN, 1))
    return moved


def check_model(model: onnx.ModelProto, serialized: bytes | None = None) -> None:
    """onnx.checker.check_model, which accepts the default-domain ops of onnxruntime a handler knows;
    given the model's protobuf bytes (`serialized`), it checks them rather than encode the model again."""
    if any(_runtime_op(n) for n in model.graph.node):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _runtime_ops_aside(copy)
        model, serialized = copy, None
    onnx.checker.check_model(model if serialized is None else serialized)


def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty, not an ONNX model")
    if size > PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{path}: {size} bytes is over protobuf's 2 GB limit; save the weights as external data"
        )
    try:
        model = read_without_weights(path.resolve())
    except (DecodeError, ValueError, IndexError):
        raise ModelLoadError(f"{path}: not an ONNX model (the protobuf is corrupt or truncated)") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror}") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version, graph or opset)")
    return model


def _check_opset(model: onnx.ModelProto, label: str) -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise ModelLoadError(f"{label}: the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(
            f"{label}: opset {opset} is not supported (supported: {MIN_OPSET} to {MAX_OPSET}); "
            "convert it with onnx.version_converter.convert_version"
        )
    # Other domains onnx defines (ai.onnx.ml, ...): a version from the future has ops nobody can check.
    known = onnx.defs.C.schema_version_map()
    for domain, version in versions.items():
        if domain not in ("", "ai.onnx") and domain in known and version > known[domain][1]:
            raise ModelLoadError(
                f"{label}: opset {version} of domain '{domain}' is newer than onnx {onnx.__version__} knows "
                f"(up to {known[domain][1]})"
            )
    return opset


def _check_initializers(model: onnx.ModelProto, label: str, base_dir: Path | None) -> None:
    """Each initializer's stored data must match its declared shape; external files must exist."""
    for tensor in model.graph.initializer:
        if any(d < 0 for d in tensor.dims) or math.prod(tensor.dims) > MAX_ELEMENTS:
            raise ModelLoadError(f"{label}: initializer '{tensor.name}' declares an impossible shape {list(tensor.dims)}")
        count = math.prod(tensor.dims)
        if tensor.data_location == TensorProto.EXTERNAL:
            _external_file(tensor, base_dir, label)
            continue
        if tensor.HasField("raw_data"):
            itemsize = _itemsize(tensor.data_type)
            if itemsize and len(tensor.raw_data) != count * itemsize:
                raise ModelLoadError(
                    f"{label}: initializer '{tensor.name}' declares shape {list(tensor.dims)} "
                    f"({count * itemsize} bytes) but stores {len(tensor.raw_data)} bytes"
                )
            continue
        stored = _typed_elements(tensor)
        if stored is not None and stored != count:
            raise ModelLoadError(
                f"{label}: initializer '{tensor.name}' declares shape {list(tensor.dims)} ({count} elements) "
                f"but stores {stored}"
            )


# Typed-field entries per element, for the types whose entries are not packed (4-bit types are).
_ENTRIES_PER_ELEMENT = {TensorProto.COMPLEX64: 2, TensorProto.COMPLEX128: 2}
_PACKED = {getattr(TensorProto, n) for n in ("INT4", "UINT4") if hasattr(TensorProto, n)}


def _typed_elements(tensor: TensorProto) -> int | None:
    """Elements stored in the tensor's typed field (float_data, int64_data, ...), or None if unknown."""
    if tensor.data_type in _PACKED or tensor.data_type == TensorProto.UNDEFINED:
        return None
    try:
        field_name = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    except (KeyError, TypeError, ValueError):
        return None
    return len(getattr(tensor, field_name)) // _ENTRIES_PER_ELEMENT.get(tensor.data_type, 1)


def _data_bytes(tensor: TensorProto) -> int:
    return math.prod(tensor.dims) * _itemsize(tensor.data_type)


def serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's protobuf bytes, or None past protobuf's 2 GB limit (the upb runtime refuses to
    encode it). Encoding a model with its weights costs as much as measuring its size (ByteSize
    encodes too), so callers encode once and check, run and write the same bytes."""
    try:
        return model.SerializeToString()
    except (EncodeError, ValueError):
        return None


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's protobuf size; past 2 GB the upb protobuf runtime refuses to compute it (EncodeError),
    and any answer over the limit is as good."""
    try:
        return model.ByteSize()
    except EncodeError:
        return PROTOBUF_LIMIT + 1


def memory_limit() -> int | None:
    """Bytes this process may allocate at most: the machine's RAM, or less under an address-space
    limit (ulimit -v); None where the platform says neither."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits, default=None)


def check_fits(label: str, nbytes: int, what: str) -> None:
    """ModelLoadError when `what` needs more bytes than this process may have: refuse before allocating."""
    memory = memory_limit()
    if memory is not None and nbytes > memory:
        raise ModelLoadError(
            f"{label}: {what} need {nbytes / 1e9:.3g} GB of memory, more than this process may use ({memory / 1e9:.3g} GB)"
        )


def _check_sizes(shapes: dict[str, tuple[int, ...]], label: str) -> None:
    for name, shape in shapes.items():
        if math.prod(shape) > MAX_ELEMENTS:
            raise ModelLoadError(
                f"{label}: tensor '{name}' has shape {list(shape)}, {math.prod(shape):.3g} elements: "
                f"more than any machine holds (limit {MAX_ELEMENTS:.3g})"
            )


def _itemsize(data_type: int) -> int:
    if data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError):
        return 0


def _external_file(tensor: TensorProto, base_dir: Path | None, label: str) -> tuple[Path, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"{label}: initializer '{tensor.name}' is external but names no file")
    if base_dir is None:
        raise ModelLoadError(
            f"{label}: initializer '{tensor.name}' keeps its data in '{location}'; load the model from "
            "its path so the file can be found"
        )
    try:
        target = _resolve_inside(base_dir, location)
        found = target is not None and target.is_file()
        size = target.stat().st_size if found else 0
    except (ValueError, OSError):  # a NUL byte, a name too long, a symlink loop
        raise ModelLoadError(f"{label}: initializer '{tensor.name}' has an invalid external data location {location!r}") from None
    if target is None:
        raise ModelLoadError(
            f"{label}: initializer '{tensor.name}' points outside the model's folder ('{location}'); refused"
        )
    if not found:
        raise ModelLoadError(f"{label}: external data file '{location}' for initializer '{tensor.name}' is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        offset = length = -1
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(f"{label}: initializer '{tensor.name}' has a malformed external data offset or length")
    needed = _data_bytes(tensor)
    if _itemsize(tensor.data_type) and length is not None and length != needed:
        raise ModelLoadError(
            f"{label}: initializer '{tensor.name}' declares shape {list(tensor.dims)} ({needed} bytes) "
            f"but stores {length} bytes in '{location}'"
        )
    if offset + (length if length is not None else needed) > size:
        raise ModelLoadError(
            f"{label}: external data file '{location}' is shorter than initializer '{tensor.name}' needs"
        )
    return target, offset, length


@functools.lru_cache(maxsize=256)
def _resolve_inside(base_dir: Path, location: str) -> Path | None:
    """The data file, or None when `location` leaves the model's folder (absolute, '..', symlinks)."""
    target = (base_dir / location).resolve()
    if os.path.isabs(location) or not target.is_relative_to(base_dir):
        return None
    return target


def _with_external_data(tensor: TensorProto, base_dir: Path | None, label: str) -> TensorProto:
    target, offset, length = _external_file(tensor, base_dir, label)
    check_fits(label, _data_bytes(tensor), f"the values of initializer '{tensor.name}'")
    with open(target, "rb") as f:
        f.seek(offset)
        raw = f.read() if length is None else f.read(length)
    loaded = TensorProto()
    loaded.CopyFrom(tensor)
    del loaded.external_data[:]
    loaded.data_location = TensorProto.DEFAULT
    loaded.raw_data = raw
    return loaded


def _weightless_view(
    model: onnx.ModelProto, label: str, requested: dict[str, tuple[int, ...]]
) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]], list[str]]:
    """A copy of the model without large weights and with every graph-input dimension fixed."""
    view = onnx.ModelProto()
    view.ir_version = model.ir_version
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    graph = view.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    for value in model.graph.output:
        declared = graph.output.add()
        declared.CopyFrom(value)
        for dim in declared.type.tensor_type.shape.dim:
            dim.Clear()
    graph.value_info.extend(model.graph.value_info)
    init_names = set()
    weight_inputs = []
    for tensor in model.graph.initializer:
        init_names.add(tensor.name)
        count = math.prod(tensor.dims)
        if count <= _SMALL_INITIALIZER and tensor.data_location != TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        else:
            weight_inputs.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))

    unknown = set(requested) - {i.name for i in model.graph.input if i.name not in init_names}
    if unknown:
        names = ", ".join(sorted(i.name for i in model.graph.input if i.name not in init_names))
        raise OptionError(f"{label}: --input-shape names {', '.join(sorted(unknown))}, not a model input (inputs: {names})")
    resolved: dict[str, tuple[int, ...]] = {}
    notes: list[str] = []
    for value in model.graph.input:
        if value.name in init_names:
            continue
        fixed = graph.input.add()
        fixed.CopyFrom(value)
        if not value.type.HasField("tensor_type"):
            raise ModelLoadError(f"{label}: input '{value.name}' is not a tensor; only tensor inputs are supported")
        resolved[value.name] = _fix_dims(fixed, requested.get(value.name), label, notes)
    graph.input.extend(weight_inputs)
    return view, resolved, notes


def _fix_dims(value: onnx.ValueInfoProto, requested: tuple[int, ...] | None, label: str, notes: list[str]) -> tuple[int, ...]:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        if requested is None:
            raise OptionError(f"{label}: input '{value.name}' has no declared shape; pass --input-shape {value.name}=...")
        dims = [None] * len(requested)
    else:
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
    if requested is not None:
        if len(requested) != len(dims):
            raise OptionError(
                f"{label}: --input-shape for '{value.name}' has rank {len(requested)}, the model's input has rank {len(dims)}"
            )
        for axis, (want, have) in enumerate(zip(requested, dims)):
            if want <= 0:
                raise OptionError(f"{label}: --input-shape for '{value.name}': dimension {axis} must be positive")
            if have is not None and have != want:
                raise OptionError(
                    f"{label}: --input-shape for '{value.name}' sets dimension {axis} to {want}, the model fixes it at {have}"
                )
        final = tuple(requested)
    else:
        unknown = [axis for axis, d in enumerate(dims) if d is None]
        if any(axis != 0 for axis in unknown):
            shown = ",".join("?" if d is None else str(d) for d in dims)
            raise OptionError(
                f"{label}: input '{value.name}' has dynamic dimensions {unknown} (shape [{shown}]); "
                f"pass --input-shape {value.name}=<{len(dims)} comma-separated sizes>"
            )
        if unknown:
            notes.append(f"input '{value.name}': dynamic batch dimension set to 1")
        final = tuple(1 if d is None else d for d in dims)
    shape = tensor_type.shape
    shape.Clear()
    for d in final:
        shape.dim.add().dim_value = d
    return final


def _infer_shapes(view: onnx.ModelProto, label: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(view, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{label}: shape inference failed: {_first_line(exc)}") from None


_MAX_FOLDED_ELEMENTS = 1 << 16


def _infer_and_fold(view: onnx.ModelProto, label: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Shape inference alternating with evaluation of shape computations (Shape -> Gather -> Div ...).

    Exporters compute slice bounds and reshape targets from x.size() at run time; with every input
    dimension fixed those are constants, and folding them lets inference see through them.
    """
    folded: dict[str, np.ndarray] = {}
    known = {t.name: numpy_helper.to_array(t) for t in view.graph.initializer}
    while True:
        inferred = _infer_shapes(view, label)
        shapes, dtypes = _collect_types(inferred)
        if _shape_function_ops(view, shapes, dtypes):
            continue
        kept, new_values = [], {}
        for node in view.graph.node:
            values = _evaluate(node, known, shapes, dtypes, view.opset_import)
            if values is None:
                kept.append(node)
                continue
            for name, value in zip(node.output, values):
                if name:
                    new_values[name] = known[name] = value
        folded.update(new_values)
        unshaped = any(o and o not in shapes and o not in folded for n in kept for o in n.output)
        if not unshaped:
            return inferred, folded
        if new_values:
            del view.graph.node[:]
            view.graph.node.extend(kept)
            view.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in new_values.items())
        elif not _shapes_from_handlers(view, inferred):
            return inferred, folded


def _shapes_from_handlers(view: onnx.ModelProto, inferred: onnx.ModelProto) -> bool:
    """Declare the output shapes that onnx cannot infer (ops of other domains) where a registered
    handler knows them; whether any was added."""
    shapes, dtypes = _collect_types(inferred)
    added = False
    for node in view.graph.node:
        missing = [o for o in node.output if o and o not in shapes]
        if not missing or not node.input:
            continue
        domain = "" if node.domain == RUNTIME_DOMAIN else node.domain
        result = handler_for(node.op_type, domain).output_shapes(node, [shapes.get(i) for i in node.input])
        for name, shape in zip(node.output, result or ()):
            if name in missing and shape is not None:
                view.graph.value_info.append(onnx.helper.make_tensor_value_info(
                    name, dtypes.get(node.input[0], TensorProto.FLOAT), list(shape)))
                added = True
    return added


def _shape_function_ops(view: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, int]) -> bool:
    """Output shapes of ops that onnx defines by a context-dependent function and its shape inference
    skips (GroupNormalization in onnx 1.17): infer them on the expanded body, and declare them in the
    view's value_info. True when any was added."""
    added = False
    declared_before = {v.name for v in view.graph.value_info}
    opset = next((o.version for o in view.opset_import if o.domain in ("", "ai.onnx")), None)
    for node in view.graph.node:
        outputs = [o for o in node.output if o]
        if node.domain not in ("", "ai.onnx") or not outputs or all(o in shapes for o in outputs):
            continue
        inputs = [i for i in node.input if i]
        if any(i not in shapes or i not in dtypes for i in inputs):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
            if not schema.has_context_dependent_function:
                continue
            types = [onnx.helper.make_tensor_type_proto(dtypes[i], shapes[i]) for i in inputs]
            body = onnx.FunctionProto.FromString(schema.get_context_dependent_function(
                node.SerializeToString(), [t.SerializeToString() for t in types]))
            graph = onnx.helper.make_graph(list(body.node), "body", [onnx.helper.make_value_info(n, t) for n, t in zip(body.input, types)],
                                           [onnx.helper.make_empty_tensor_value_info(o) for o in body.output])
            model = onnx.helper.make_model(graph, opset_imports=list(body.opset_import))
            declared = onnx.shape_inference.infer_shapes(model, data_prop=True).graph.output
        except Exception:  # noqa: BLE001 - an op onnx cannot expand keeps its unknown shape
            continue
        for name, value in zip(node.output, declared):
            dims = value.type.tensor_type.shape.dim
            if name and name not in declared_before and value.type.tensor_type.HasField("shape") and all(
                    d.HasField("dim_value") for d in dims):
                view.graph.value_info.append(onnx.helper.make_tensor_value_info(
                    name, value.type.tensor_type.elem_type, [d.dim_value for d in dims]))
                added = True
    return added


def _evaluate(node: onnx.NodeProto, known: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
              dtypes: dict[str, int], opsets) -> list[np.ndarray] | None:
    """The node's outputs where the handler folds them from what is known of the inputs (BaseHandler.fold),
    or once every input is a constant; None where they are not constants (or too large to keep)."""
    handler = handler_for(node.op_type, node.domain)
    if node.domain not in ("", "ai.onnx") or not handler.foldable:
        return None
    outputs = handler.fold(node, [known.get(i) if i else None for i in node.input],
                           [shapes.get(i) if i else None for i in node.input],
                           [dtypes.get(i) if i else None for i in node.input])
    if outputs is None:
        if not node.input or any(name and name not in known for name in node.input):
            return None
        try:
            outputs = _run_node(node, {name: known[name] for name in node.input if name}, opsets)
        except Exception:  # noqa: BLE001 - an op the reference runtime cannot run is simply not folded
            return None
    values = [np.asarray(v) for v in outputs]
    if any(v.size > _MAX_FOLDED_ELEMENTS for v in values):
        return None
    return values


def _run_node(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets) -> list[np.ndarray]:
    """Run one node with the reference runtime under the model's own opset (Unsqueeze-11 takes an
    attribute where Unsqueeze-13 takes an input); an op's handler may compute it itself (the
    reference runtime lacks some versions of some ops, such as DequantizeLinear before opset 19)."""
    from onnx.reference import ReferenceEvaluator

    computed = handler_for(node.op_type, node.domain).evaluate(node, [feeds.get(i) if i else None for i in node.input])
    if computed is not None:
        return computed

    inputs = [
        onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        for name, value in feeds.items()
    ]
    outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in node.output if name]
    graph = onnx.helper.make_graph([node], "fold", inputs, outputs)
    return ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opsets)).run(None, feeds)


def _collect_types(inferred: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, int] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        dtypes[value.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
        dtypes[tensor.name] = tensor.data_type
    return shapes, dtypes


def _first_line(exc: Exception) -> str:
    """The message on one line, without the checker's boilerplate, at most 300 characters."""
    text = " ".join(str(exc).replace("==> Context:", "").split())
    return (text[:297] + "...") if len(text) > 300 else (text or type(exc).__name__)


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """Parse CLI specs like 'input=1,3,224,224' into {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape:
            raise OptionError(f"--input-shape '{spec}': expected NAME=D0,D1,... (for example input=1,3,224,224)")
        shapes[name] = shape
    return shapes
