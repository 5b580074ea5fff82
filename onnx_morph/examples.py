"""The built-in example: a small ResNet-style CNN exported to ONNX, and `onnx-morph demo`, MorphNet's
loop on it with data that needs no download."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from onnx_morph.loop import LoopResult


def small_resnet(width: int = 16, num_classes: int = 10, widths: tuple[int, int, int] | None = None):
    """A CIFAR-style ResNet with two stages, projection shortcut and a Flatten->Gemm head (28x28 input).

    `widths` sets the three stages' widths (stem and first block, second block, third block);
    by default they are (width, 2 * width, 4 * width).
    """
    import torch
    from torch import nn

    w0, w1, w2 = widths if widths is not None else (width, 2 * width, 4 * width)

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    return nn.Sequential(
        nn.Conv2d(1, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(),
        Block(w0, w0, 1), Block(w0, w1, 2), Block(w1, w2, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, num_classes),
    )


def export(module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Export for MorphNet: eval mode, BatchNorm kept (no constant folding), dynamic batch."""
    import torch

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, torch.randn(*input_shape), str(path), dynamo=False, do_constant_folding=False,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


# (epochs shrinking, epochs fine-tuning, learning rate, training images) per data set and mode: digits
# has 1,437 training images, so it takes more epochs for as many steps.
_SETTINGS = {
    ("fashion-mnist", False): (2, 1, 0.005, None),
    ("fashion-mnist", True): (3, 1, 0.02, 2048),
    ("digits", False): (16, 4, 0.02, None),
    ("digits", True): (8, 2, 0.02, None),
}


def demo(out: TextIO, work_dir: str | os.PathLike = "onnx-morph-demo", quick: bool = False, data: str | None = None,
         target_ratio: float = 0.5) -> LoopResult:
    """MorphNet end to end: export the example CNN, shrink it with the Gamma FLOPs regularizer in
    onnxruntime-training to `target_ratio` of its FLOPs, prune it, fine-tune it, and report each stage.

    `data` None takes Fashion-MNIST where it is installed, cached or can be downloaded, and
    scikit-learn's digits otherwise (saying why)."""
    import torch

    from onnx_morph.data import load_dataset
    from onnx_morph.errors import OptionError
    from onnx_morph.loop import morphnet_loop, plot
    from onnx_morph.report import render_loop

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    name = data or "fashion-mnist"
    try:
        dataset = load_dataset(name)
    except OptionError as exc:
        if data is not None:
            raise
        print(f"{exc}; using digits instead.", file=out)
        name, dataset = "digits", load_dataset("digits")
    epochs, finetune_epochs, learning_rate, images = _SETTINGS[name, quick]
    dataset = dataset.fitted((1, 1, 28, 28)).subset(train=images, test=1000 if quick else None)
    torch.manual_seed(0)
    path = export(small_resnet(), (1, 1, 28, 28), work / "seed.onnx")
    print(f"seed: a ResNet-style CNN for 28x28 inputs ({path}); data: {dataset.name}, "
          f"{len(dataset.y_train)} training and {len(dataset.y_test)} test images; target: {target_ratio:.0%} of the "
          "FLOPs", file=out)
    result = morphnet_loop(path, dataset, work, progress=sys.stderr, epochs=epochs, finetune_epochs=finetune_epochs,
                           learning_rate=learning_rate, target_ratio=target_ratio)
    print(render_loop(result), file=out)
    print(f"plot: {plot(result, work / 'morphnet.png')}; models, logs and structures in {work}/", file=out)
    return result
