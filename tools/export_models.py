#!/usr/bin/env python
"""Export torchvision ResNet-50 and DenseNet-121 (random init) to ONNX for benchmarks.

Usage: python -m tools.export_models --workdir DIR [--models resnet50 densenet121] [--reuse]

Weights are random (``weights=None``, torch seeded with 0), nothing is downloaded.
Export uses the TorchScript exporter (``dynamo=False``), ``do_constant_folding=False``
and torch's default opset, input 1x3x224x224, through ``tools/zoo.py``'s ``export_onnx``.
``import torchvision`` goes through ``tools/zoo.py``'s ``import_torchvision()``, which
defines the ``torchvision::nms``/``qnms`` schemas that torchvision 0.28.0's compiled ops
fail to register beside CPU torch 2.13.

Prints one JSON object ``{name: path}`` on the last line of stdout.
Run as a separate process so that torch stays out of the benchmark's own process.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

MODELS = {
    # name -> torchvision.models attribute
    "resnet50": "resnet50",
    "densenet121": "densenet121",
}
INPUT_SHAPE = (1, 3, 224, 224)


def export_models(workdir, names=tuple(MODELS), reuse: bool = False) -> dict[str, pathlib.Path]:
    import torch
    from tools.zoo import export_onnx, import_torchvision

    tv = import_torchvision()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        path = workdir / f"{name}.onnx"
        if not (reuse and path.is_file() and path.stat().st_size > 0):
            torch.manual_seed(0)
            model = getattr(tv.models, MODELS[name])(weights=None)
            export_onnx(model, INPUT_SHAPE, path)  # dynamo=False, do_constant_folding=False
        out[name] = path
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reuse", action="store_true", help="keep an existing DIR/NAME.onnx instead of re-exporting")
    args = ap.parse_args(argv)
    paths = export_models(args.workdir, args.models, args.reuse)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
