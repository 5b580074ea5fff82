"""Reading a model without its weights: large initializers' raw bytes are left in the file and
referenced as external data (offset and length inside the model file itself), so loading costs
memory for the graph, not for the weights."""

from __future__ import annotations

import mmap
from pathlib import Path

import onnx
from onnx import TensorProto

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_LENGTH_DELIMITED = 2
# Raw data at least this long stays in the file.
LAZY_BYTES = 4096


def _varint(buffer, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buffer, start: int, end: int):
    """(field number, wire type, field start, value start, value end) of each field in buffer[start:end]."""
    position = start
    while position < end:
        field_start = position
        tag, position = _varint(buffer, position)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, position = _varint(buffer, position)
            value_start = position
        elif wire == 1:
            value_start, position = position, position + 8
        elif wire == _LENGTH_DELIMITED:
            length, value_start = _varint(buffer, position)
            position = value_start + length
        elif wire == 5:
            value_start, position = position, position + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if position > end:
            raise ValueError("field runs past its message")
        yield number, wire, field_start, value_start, position


def read_without_weights(path: Path) -> onnx.ModelProto:
    """Parse `path`, leaving every raw_data of LAZY_BYTES or more in the file as external data."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        model_bytes = bytearray()
        initializers: list[TensorProto] = []
        graph_bytes = None
        for number, wire, field_start, value_start, end in _fields(buffer, 0, len(buffer)):
            if number == _MODEL_GRAPH and wire == _LENGTH_DELIMITED:
                graph_bytes = _graph_without_initializers(buffer, value_start, end, initializers, path.name)
            else:
                model_bytes += buffer[field_start:end]
    model = onnx.ModelProto()
    model.ParseFromString(bytes(model_bytes))
    if graph_bytes is not None:
        model.graph.ParseFromString(graph_bytes)
        # Initializers were taken out to be parsed one by one; their order is kept.
        model.graph.initializer.extend(initializers)
    return model


def _graph_without_initializers(buffer, start: int, end: int, initializers: list[TensorProto], location: str) -> bytes:
    rest = bytearray()
    for number, wire, field_start, value_start, field_end in _fields(buffer, start, end):
        if number == _GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED:
            initializers.append(_tensor(buffer, value_start, field_end, location))
        else:
            rest += buffer[field_start:field_end]
    return bytes(rest)


def _tensor(buffer, start: int, end: int, location: str) -> TensorProto:
    kept = bytearray()
    external = None
    for number, wire, field_start, value_start, field_end in _fields(buffer, start, end):
        if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED and field_end - value_start >= LAZY_BYTES:
            external = (value_start, field_end - value_start)
        else:
            kept += buffer[field_start:field_end]
    tensor = TensorProto()
    tensor.ParseFromString(bytes(kept))
    if external is not None:
        if tensor.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"initializer '{tensor.name}' has both raw data and external data")
        offset, length = external
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_VARINT = 0


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, parts: list) -> list:
    """A length-delimited field holding `parts` (bytes-like pieces, joined only at the end)."""
    return [_varint_bytes(number << 3 | _LENGTH_DELIMITED), _varint_bytes(sum(len(p) for p in parts)), *parts]


def with_data(model: onnx.ModelProto, data, appendix: bytes = b"") -> list:
    """`model`'s protobuf bytes, as a list of pieces to join or write in turn, with the data of each
    external initializer, in order, taken from the iterator `data` into its raw_data: the bytes
    that load_external_data_for_model followed by SerializeToString give, field for field, but only
    the graph is encoded, and the weights are copied once, from the file to where the pieces go.
    `data` gives (view, from_file): a view of the file that holds the data, or of an array that
    numpy_helper.from_array would have stored (no data_location then, as from_array writes none).
    `appendix` (more protobuf fields, see verify.with_outputs) comes last."""
    encoded = memoryview(model.SerializeToString())
    initializers = iter(model.graph.initializer)
    parts: list = []
    for number, wire, field_start, value_start, end in _fields(encoded, 0, len(encoded)):
        if number != _MODEL_GRAPH or wire != _LENGTH_DELIMITED:
            parts.append(encoded[field_start:end])
            continue
        graph: list = []
        for inner, inner_wire, start, inner_value, inner_end in _fields(encoded, value_start, end):
            if inner == _GRAPH_INITIALIZER and inner_wire == _LENGTH_DELIMITED \
                    and next(initializers).data_location == TensorProto.EXTERNAL:
                graph += _field(inner, _inlined(encoded, inner_value, inner_end, *next(data)))
            else:
                graph.append(encoded[start:inner_end])
        parts += _field(number, graph)
    return [*parts, appendix]


def _inlined(encoded: memoryview, start: int, end: int, raw, from_file: bool) -> list:
    """An external tensor's fields with `raw` as its raw_data and, `from_file`, its location the
    default (as load_external_data_for_model sets it), in field-number order as protobuf writes them."""
    fields = [(number, [encoded[field_start:field_end]])
              for number, _, field_start, _, field_end in _fields(encoded, start, end)
              if number not in (_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION)]
    fields.append((_TENSOR_RAW_DATA, _field(_TENSOR_RAW_DATA, [raw])))
    if from_file:
        fields.append((_TENSOR_DATA_LOCATION, [_varint_bytes(_TENSOR_DATA_LOCATION << 3 | _VARINT), b"\0"]))
    fields.sort(key=lambda field: field[0])
    return [part for _, pieces in fields for part in pieces]
