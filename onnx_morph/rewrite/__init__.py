"""Rewrites of the model, in two subpackages: `surgery` (prune, expand, verify, calibrate, save) and
`training` (the regularizer as ONNX nodes, onnxruntime-training artifacts, gates, batch-flexible exports).
`editing` holds the protobuf helpers both use.

The criteria of `prune` import nothing heavy; the rest is imported on first use, so that the CLI can
read the criteria's defaults while it builds its parser."""

from __future__ import annotations

import importlib

from onnx_morph.rewrite.surgery.criteria import Budget, Criterion, Mask, Threshold

_LAZY = {"LayerWidth": "prune", "PruneResult": "prune", "prune": "prune", "prune_file": "prune",
         "save_model": "save", "Deviation": "verify"}

__all__ = ["Budget", "Criterion", "Mask", "Threshold", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"onnx_morph.rewrite.surgery.{_LAZY[name]}"), name)
