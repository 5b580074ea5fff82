"""A built-in example: a small ResNet-style CNN exported to ONNX, so `onnx-morph demo` needs no input."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TextIO


def small_resnet(width: int = 16, num_classes: int = 10):
    """A CIFAR-style ResNet with two stages, projection shortcut and a Flatten->Gemm head (28x28 input)."""
    import torch
    from torch import nn

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
        nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
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


def demo(out: TextIO) -> None:
    """Export the example CNN, make a third of its channels dead (BN scale 0), and analyze it."""
    import torch

    from onnx_morph.analysis import analyze
    from onnx_morph.report import render

    torch.manual_seed(0)
    model = small_resnet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight[torch.randperm(module.num_features)[: module.num_features // 3]] = 0.0
    with tempfile.TemporaryDirectory() as work:
        path = export(model, (1, 1, 28, 28), Path(work) / "small_resnet.onnx")
        print(f"exported a ResNet-style CNN for 28x28 inputs, a third of its BN scales set to 0: {path.name}", file=out)
        print(render(analyze(path, gamma_threshold=1e-3)), file=out)
