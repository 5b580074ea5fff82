"""Channel grids: tensors whose channels span several axes, such as attention heads x head dims.

Elements are numbered row-major over the channel axes in the order the tensor lists them. A grid
can only shrink to a smaller grid, so it is prunable when every class is made of whole slices along
one axis: whole heads along the head axis, or the same heads of Q, K and V along the embedding axis
of a fused [3, E] projection.
"""

from __future__ import annotations

import numpy as np

from onnx_morph.handlers import TensorInfo


def grid_dims(info: TensorInfo) -> tuple[int, ...]:
    return tuple(info.shape[a] for a in info.axes)


def sliced_axis(info: TensorInfo, classes: np.ndarray) -> int | None:
    """The axis along which every class of the grid is made of whole slices; None if there is none."""
    dims = grid_dims(info)
    grid = classes.reshape(dims)
    for position, axis in enumerate(info.axes):
        rows = np.moveaxis(grid, position, 0).reshape(dims[position], -1)
        if np.all(rows == rows[:, :1]):
            return axis
    return None


def slice_classes(info: TensorInfo, classes: np.ndarray, axis: int) -> np.ndarray | None:
    """The class of each slice of the tensor along `axis`, or None when that axis never shrinks on
    its own (it is not a channel axis, or its slices mix classes, so the grid shrinks along another)."""
    if info.axes is None or axis not in info.axes:
        return None
    if info.axes == (axis,):
        return classes
    position = info.axes.index(axis)
    dims = grid_dims(info)
    rows = np.moveaxis(classes.reshape(dims), position, 0).reshape(dims[position], -1)
    return rows[:, 0] if np.all(rows == rows[:, :1]) else None

