"""Datasets that need no download: Fashion-MNIST from Debian's package, scikit-learn's digits, or a .npz file."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_morph.errors import OptionError

FASHION_MNIST_DIR = Path(os.environ.get("ONNX_MORPH_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_HELP = ("Fashion-MNIST is not installed: `sudo apt install dataset-fashion-mnist` (Debian/Ubuntu) puts it in "
                      f"{FASHION_MNIST_DIR}, or set ONNX_MORPH_FASHION_MNIST to a folder with its four IDX .gz files; "
                      "`--data digits` needs no install")


@dataclass(frozen=True)
class Dataset:
    """Images as float32 NCHW normalized to zero mean and unit variance (over the training set); labels int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        return Dataset(self.name, self.x_train[:train], self.y_train[:train], self.x_test[:test], self.y_test[:test])

    def resized(self, height: int, width: int) -> Dataset:
        """Images bilinearly resized to the model's input size (digits are 8x8, the example CNN takes 28x28)."""
        if self.x_train.shape[2:] == (height, width):
            return self
        return Dataset(f"{self.name} resized to {height}x{width}", _resize(self.x_train, height, width), self.y_train,
                       _resize(self.x_test, height, width), self.y_test)

    def fitted(self, input_shape: tuple[int, ...]) -> Dataset:
        """Resized to an image model's input (N, C, H, W); other inputs are taken as they are."""
        return self.resized(input_shape[2], input_shape[3]) if len(input_shape) == 4 else self

    def calibration_batches(self, images: int = 1280, batch_size: int = 64) -> list[np.ndarray]:
        """The first `images` training images in batches: inputs on which to re-measure BatchNorm statistics."""
        if images < 1 or batch_size < 1:
            raise OptionError(f"calibration takes at least one image in batches of at least one, not {images} "
                              f"in batches of {batch_size}")
        x = self.x_train[:images]
        return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def load_dataset(name: str) -> Dataset:
    """'fashion-mnist', 'digits', or a path to an .npz with x_train, y_train, x_test, y_test."""
    if name == "fashion-mnist":
        return fashion_mnist()
    if name == "digits":
        return digits()
    if name.endswith(".npz"):
        return _npz(Path(name))
    raise OptionError(f"unknown data '{name}': use fashion-mnist, digits, or a file.npz")


def fashion_mnist_available() -> bool:
    return all((FASHION_MNIST_DIR / f).is_file() for f in _FASHION_FILES)


_FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def fashion_mnist() -> Dataset:
    if not fashion_mnist_available():
        raise OptionError(FASHION_MNIST_HELP)
    x_train, y_train, x_test, y_test = (_idx(FASHION_MNIST_DIR / f) for f in _FASHION_FILES)
    return _normalized("fashion-mnist", x_train[:, None], y_train, x_test[:, None], y_test)


def digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    x, y = bunch.images[order][:, None], bunch.target[order]
    cut = int(0.8 * len(y))
    return _normalized("digits", x[:cut], y[:cut], x[cut:], y[cut:])


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise OptionError(f"{path}: no such file")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as exc:
        raise OptionError(f"{path}: needs arrays x_train, y_train, x_test, y_test (missing {exc})") from None
    except (OSError, ValueError) as exc:
        raise OptionError(f"{path}: not a readable .npz file ({exc})") from None
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise OptionError(f"{path}: x_{split} and y_{split} have different lengths")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.ndim == 3:
        x_train, x_test = x_train[:, None], x_test[:, None]
    return _normalized(path.name, x_train, arrays["y_train"], x_test, arrays["y_test"])


def _normalized(name, x_train, y_train, x_test, y_test) -> Dataset:
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    return Dataset(name, (x_train - mean) / std, y_train.astype(np.int64), (x_test - mean) / std, y_test.astype(np.int64))


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    import torch

    resized = torch.nn.functional.interpolate(torch.from_numpy(x), size=(height, width), mode="bilinear",
                                              align_corners=False)
    return resized.numpy()
