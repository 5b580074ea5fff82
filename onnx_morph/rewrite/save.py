"""Atomic writes: a model appears at its path whole or not at all, and never over its source."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnx_morph.errors import OptionError

_PROTOBUF_LIMIT = 2**31 - 1


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write `model` to `path` through a temporary file in the same folder, then rename.

    Models over protobuf's 2 GB limit are written with their weights in `<name>.data` beside them.
    """
    target = Path(path)
    if source is not None:
        refuse_overwrite(target, source)
    folder = target.resolve().parent
    if not folder.is_dir():
        raise OptionError(f"{target}: the folder {folder} does not exist")
    external = model.ByteSize() > _PROTOBUF_LIMIT
    data_name = target.name + ".data"
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
    except OSError as exc:
        raise OptionError(f"{target}: cannot write: {exc.strerror or exc}") from None
    temp_data = Path(temp + ".data")
    try:
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, temp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=temp_data.name, size_threshold=1024)
            _rename_location(temp, temp_data.name, data_name)
            os.replace(temp_data, folder / data_name)
        else:
            with open(temp, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(temp, target)
    except OSError as exc:
        raise OptionError(f"{target}: cannot write: {exc.strerror or exc}") from None
    finally:
        for leftover in (Path(temp), temp_data):
            if leftover.exists():
                leftover.unlink()
    return target


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a small text file atomically."""
    target = Path(path)
    folder = target.resolve().parent
    if not folder.is_dir():
        raise OptionError(f"{target}: the folder {folder} does not exist")
    temp = None
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(temp, target)
    except OSError as exc:
        raise OptionError(f"{target}: cannot write: {exc.strerror or exc}") from None
    finally:
        if temp is not None and Path(temp).exists():
            Path(temp).unlink()


def _rename_location(model_path: str, old: str, new: str) -> None:
    model = onnx.load_model(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())


def refuse_overwrite(target: str | os.PathLike, source: str | os.PathLike) -> None:
    """OptionError when writing `target` would replace the input model `source`."""
    if _same_file(Path(target), Path(source)):
        raise OptionError(f"{target}: refusing to overwrite the input model; choose another output path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
