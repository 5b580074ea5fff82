"""Training data for the MorphNet loop, adapted to a model's input.

Sources: Fashion-MNIST (Debian's `dataset-fashion-mnist` files, or downloaded once into a cache and
checked against the published MD5 sums), scikit-learn's digits, an `.npz` file, or an image
folder with one subfolder per class. Every source becomes float32 NCHW images standardized by the
training set's mean and standard deviation; `fit` then adapts them to a model's input: channels,
height and width, and optionally a per-channel normalization of [0, 1] pixels.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from onnx_morph.errors import OptionError
from onnx_morph.rewrite.training import BATCH_SIZE, CALIBRATION_BATCHES

CALIBRATION_IMAGES = CALIBRATION_BATCHES * BATCH_SIZE

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# The MD5 sums the dataset's authors publish next to the files; a download that does not match is discarded.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_FASHION_FILES = tuple(FASHION_MNIST_MD5)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# ITU-R BT.601 luma, what Pillow's convert("L") uses.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Dataset:
    """Images as float32 NCHW, standardized: x = (pixels - pixel_mean) / pixel_std, pixels in [0, 1];
    labels int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        return replace(self, x_train=self.x_train[:train], y_train=self.y_train[:train], x_test=self.x_test[:test],
                       y_test=self.y_test[:test])

    def resized(self, height: int, width: int) -> Dataset:
        """Images bilinearly resized (digits are 8x8, the example CNN takes 28x28)."""
        if self.x_train.shape[2:] == (height, width):
            return self
        return replace(self, name=f"{self.name} resized to {height}x{width}",
                       x_train=_resize(self.x_train, height, width), x_test=_resize(self.x_test, height, width))

    def fitted(self, input_shape: Sequence[int], mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> Dataset:
        """Adapted to a model input of `input_shape`: (N, C, H, W) images get C channels (gray repeated
        to RGB, RGB to gray by luma) and H x W pixels; (N, F) inputs get the flattened image when F
        matches. With `mean` and `std` (one value, or one per channel, for pixels in [0, 1]) the
        images are normalized by them instead of by the training set's statistics."""
        shape = tuple(int(d) for d in input_shape)
        data = self
        images = data.x_train.ndim == 4
        if images and len(shape) == 4:
            data = data._with_channels(shape[1]).resized(shape[2], shape[3])
        if mean is not None or std is not None:
            if not images:
                raise OptionError(f"mean and std normalize image channels; data '{self.name}' has samples of shape "
                                  f"{list(self.x_train.shape[1:])}")
            data = data._normalized_by(mean, std)
        sample = shape[1:]
        if tuple(data.x_train.shape[1:]) == sample:
            return data
        if int(np.prod(data.x_train.shape[1:])) == int(np.prod(sample)) and (len(shape) != 4 or not images):
            return replace(data, x_train=data.x_train.reshape(-1, *sample), x_test=data.x_test.reshape(-1, *sample))
        raise OptionError(f"data '{self.name}' has samples of shape {list(self.x_train.shape[1:])}, which cannot be "
                          f"adapted to the model's input of shape {list(shape)}")

    def _with_channels(self, channels: int) -> Dataset:
        have = self.x_train.shape[1]
        if have == channels:
            return self
        if have == 1 and channels == 3:
            convert, how = (lambda x: np.repeat(x, channels, axis=1)), f"gray repeated to {channels} channels"
        elif have == 3 and channels == 1:
            convert, how = (lambda x: np.einsum("nchw,c->nhw", x, LUMA)[:, None]), "RGB to gray"
        else:
            raise OptionError(f"data '{self.name}' has {have} channels per image and the model's input takes {channels}; "
                              "only gray to RGB (repeat) and RGB to gray (luma) are converted")
        return replace(self, name=f"{self.name}, {how}", x_train=convert(self.x_train), x_test=convert(self.x_test))

    def _normalized_by(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> Dataset:
        channels = self.x_train.shape[1]
        mean = _per_channel(mean if mean is not None else [0.0], channels, "mean")
        std = _per_channel(std if std is not None else [1.0], channels, "std")
        if not (std > 0).all():
            raise OptionError(f"every std must be positive, not {std.tolist()}")

        def convert(x: np.ndarray) -> np.ndarray:
            pixels = x * self.pixel_std + self.pixel_mean
            return ((pixels - mean) / std).astype(np.float32)

        return replace(self, x_train=convert(self.x_train), x_test=convert(self.x_test), pixel_mean=0.0, pixel_std=1.0)

    def calibration_batches(self, images: int = CALIBRATION_IMAGES, batch_size: int = BATCH_SIZE) -> list[np.ndarray]:
        """The first `images` training images in batches: inputs on which to re-measure BatchNorm statistics."""
        if images < 1 or batch_size < 1:
            raise OptionError(f"calibration takes at least one image in batches of at least one, not {images} "
                              f"in batches of {batch_size}")
        x = self.x_train[:images]
        return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def _per_channel(values: Sequence[float], channels: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size not in (1, channels):
        raise OptionError(f"{what} takes 1 or {channels} values (one per input channel), not {array.size}")
    return array.reshape(1, -1, 1, 1) if array.size == channels else array.reshape(1, 1, 1, 1)


DATA_HELP = "fashion-mnist | digits | FILE.npz (x_train, y_train, x_test, y_test) | FOLDER (one subfolder of images per class)"


def load_dataset(name: str | os.PathLike, image_size: tuple[int, int] | None = None) -> Dataset:
    """'fashion-mnist', 'digits', an .npz with x_train, y_train, x_test, y_test, or an image folder
    (read at `image_size`, default the first image's size)."""
    text = str(name)
    if text == "fashion-mnist":
        return fashion_mnist()
    if text == "digits":
        return digits()
    path = Path(text)
    if path.is_dir():
        return image_folder(path, image_size)
    if text.endswith(".npz"):
        return _npz(path)
    raise OptionError(f"unknown data '{text}': use {DATA_HELP}")


def fashion_mnist_dirs() -> list[Path]:
    """Where Fashion-MNIST's four files are looked for, in order: ONNX_MORPH_FASHION_MNIST (a folder, or
    empty to look nowhere but the cache), Debian's folder, then the download cache."""
    override = os.environ.get("ONNX_MORPH_FASHION_MNIST")
    system = [Path(override)] if override else ([] if override == "" else [FASHION_MNIST_DIR])
    return system + [cache_dir() / "fashion-mnist"]


def cache_dir() -> Path:
    if os.environ.get("ONNX_MORPH_CACHE"):
        return Path(os.environ["ONNX_MORPH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnx-morph"


def _fashion_dir() -> Path | None:
    return next((d for d in fashion_mnist_dirs() if all((d / f).is_file() for f in _FASHION_FILES)), None)


def fashion_mnist_available() -> bool:
    """Installed or already downloaded: no network needed."""
    return _fashion_dir() is not None


def fashion_mnist(download: bool = True) -> Dataset:
    folder = _fashion_dir()
    if folder is None and download:
        folder = download_fashion_mnist()
    if folder is None:
        raise OptionError(_fashion_help())
    x_train, y_train, x_test, y_test = (_idx(folder / f) for f in _FASHION_FILES)
    return _standardized("fashion-mnist", x_train[:, None] / np.float32(255), y_train, x_test[:, None] / np.float32(255),
                         y_test)


def _fashion_help(reason: str = "") -> str:
    return (f"Fashion-MNIST is not installed{' and ' + reason if reason else ''}: `apt install dataset-fashion-mnist` "
            f"(Debian/Ubuntu) puts it in {FASHION_MNIST_DIR}, or set ONNX_MORPH_FASHION_MNIST to a folder with its "
            f"four IDX .gz files, or let it download from {os.environ.get('ONNX_MORPH_FASHION_MNIST_URL') or FASHION_MNIST_MIRROR} "
            f"into {cache_dir() / 'fashion-mnist'}; `--data digits` needs neither")


def download_fashion_mnist(mirror: str | None = None, checksums: dict[str, str] | None = None,
                           timeout: float = 60.0) -> Path:
    """Fetch the four files into the cache, each checked against its published MD5 sum before it is kept."""
    import urllib.request

    mirror = mirror or os.environ.get("ONNX_MORPH_FASHION_MNIST_URL") or FASHION_MNIST_MIRROR
    checksums = checksums or FASHION_MNIST_MD5
    folder = cache_dir() / "fashion-mnist"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(_fashion_help(f"the cache folder cannot be made ({exc.strerror})")) from None
    for name, digest in checksums.items():
        if (folder / name).is_file():
            continue
        url = mirror.rstrip("/") + "/" + name
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as part:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, part)
            except (OSError, ValueError) as exc:
                os.unlink(part.name)
                raise OptionError(_fashion_help(f"downloading {url} failed ({getattr(exc, 'reason', exc)})")) from None
        if _md5(Path(part.name)) != digest:
            os.unlink(part.name)
            raise OptionError(_fashion_help(f"{url} does not have the published MD5 checksum"))
        os.replace(part.name, folder / name)
    return folder


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    x, y = bunch.images[order][:, None] / 16.0, bunch.target[order]
    cut = int(0.8 * len(y))
    return _standardized("digits", x[:cut], y[:cut], x[cut:], y[cut:])


def image_folder(root: Path, image_size: tuple[int, int] | None = None) -> Dataset:
    """One subfolder per class (sorted names are the labels 0, 1, ...), as torchvision's ImageFolder.
    With `train/` and `test/` (or `val/`) subfolders, those are the splits; otherwise a fixed 80/20 split."""
    splits = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    if "train" in splits and len(splits) > 1:
        train_x, train_y, classes = _read_classes(splits["train"], image_size, None)
        test = splits.get("test", splits.get("val"))
        test_x, test_y, _ = _read_classes(test, image_size or train_x.shape[2:], classes)
        return _standardized(root.name, train_x, train_y, test_x, test_y)
    x, y, _ = _read_classes(root, image_size, None)
    order = np.random.default_rng(0).permutation(len(y))
    cut = max(1, int(0.8 * len(y)))
    return _standardized(root.name, x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]])


def _read_classes(root: Path, size, classes: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or found
    if len(classes) < 2:
        raise OptionError(f"{root}: an image folder needs one subfolder per class (at least 2), found {len(found)}")
    images, labels, mode = [], [], None
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (root / name).is_dir() else []
        for path in files:
            try:
                with Image.open(path) as image:
                    mode = mode or ("L" if image.mode in ("1", "L", "I;16", "I") else "RGB")
                    size = size or (image.height, image.width)
                    image = image.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
                    images.append(np.asarray(image, dtype=np.float32) / 255.0)
            except (OSError, UnidentifiedImageError) as exc:
                raise OptionError(f"{path}: not a readable image ({exc})") from None
            labels.append(label)
    if not images:
        raise OptionError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class subfolders")
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x, np.array(labels, dtype=np.int64), classes


def _npz(path: Path) -> Dataset:
    """Arrays x_train, y_train, x_test, y_test; images (N, H, W) or (N, C, H, W), uint8 pixels (0..255)
    or floats taken as they are."""
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
    if x_train.dtype == np.uint8:
        x_train, x_test = x_train / np.float32(255), x_test / np.float32(255)
    if x_train.ndim == 3:
        x_train, x_test = x_train[:, None], x_test[:, None]
    return _standardized(path.name, x_train, arrays["y_train"], x_test, arrays["y_test"])


def _standardized(name, x_train, y_train, x_test, y_test) -> Dataset:
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    return Dataset(name, (x_train - mean) / std, y_train.astype(np.int64), (x_test - mean) / std,
                   y_test.astype(np.int64), mean, std)


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise OptionError(f"{path}: not a readable IDX .gz file ({exc})") from None
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    import torch

    resized = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(height, width),
                                              mode="bilinear", align_corners=False)
    return resized.numpy()
