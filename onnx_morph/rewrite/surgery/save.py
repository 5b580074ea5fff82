"""Atomic writes: a model appears at its path whole or not at all, and never over its source."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx

from onnx_morph.errors import OptionError, OutputError
from onnx_morph.graph.load import PROTOBUF_LIMIT, serialized as encoded


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
               serialized: bytes | None = None) -> Path:
    """Write `model` to `path` through a temporary file in the same folder, then rename; `serialized`,
    when the caller has it, is `model`'s protobuf bytes (written as they are, not encoded again).

    Models over protobuf's 2 GB limit are written with their weights in `<name>.data` beside them.
    """
    target = Path(path)
    if source is not None:
        refuse_overwrite(target, source)
    folder = target.resolve().parent
    if not folder.is_dir():
        raise OutputError(f"{target}: the folder {folder} does not exist")
    data = serialized if serialized is not None else encoded(model)
    if data is not None and len(data) <= PROTOBUF_LIMIT:
        _write_atomically(target, folder, lambda f: f.write(data))
        return target
    data_name = target.name + ".data"
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    temp_data = Path(temp + ".data")
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, temp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=temp_data.name, size_threshold=1024)
        _rename_location(temp, temp_data.name, data_name)
        os.replace(temp_data, folder / data_name)
        os.replace(temp, target)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from None
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
        raise OutputError(f"{target}: the folder {folder} does not exist")
    _write_atomically(target, folder, lambda f: f.write(text.encode()))


def _write_atomically(target: Path, folder: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write into a file without a name (O_TMPFILE) and give it its name only when complete, so that
    even a process killed mid-write (SIGKILL, a full disk's SIGXFSZ) leaves nothing behind; where
    the file system has no O_TMPFILE, a named temporary file that an exception removes.
    Either way the data is on disk (fsync) before the rename makes it visible."""
    temp = None
    try:
        handle = _unnamed_file(folder)
        if handle is None:
            handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if temp is None:
                temp = _link_unnamed(f.fileno(), folder, target.name)
        os.replace(temp, target)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    finally:
        if temp is not None and os.path.lexists(temp):
            os.unlink(temp)


def _unnamed_file(folder: Path) -> int | None:
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except OSError:  # the file system does not support it (EOPNOTSUPP, EISDIR on old kernels)
        return None


def _link_unnamed(fd: int, folder: Path, name: str) -> str:
    """Give the unnamed file a temporary name in `folder` (the rename to the target follows at once).

    A dir_fd makes os.link call linkat with AT_SYMLINK_FOLLOW, which links the file behind
    /proc/self/fd/N rather than that symlink itself."""
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        while True:
            temp = f".{name}.{secrets.token_hex(6)}.tmp"
            try:
                os.link(f"/proc/self/fd/{fd}", temp, dst_dir_fd=folder_fd, follow_symlinks=True)
                return str(folder / temp)
            except FileExistsError:
                continue
    finally:
        os.close(folder_fd)


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
