"""Rewrites of the model, in two subpackages: `surgery` (prune, expand, verify, calibrate, save) and
`training` (the regularizer as ONNX nodes, onnxruntime-training artifacts, gates, batch-flexible exports).
`editing` holds the protobuf helpers both use."""

from onnx_morph.rewrite.surgery.prune import LayerWidth, PruneResult, prune, prune_file
from onnx_morph.rewrite.surgery.save import save_model
from onnx_morph.rewrite.surgery.verify import Deviation

__all__ = ["LayerWidth", "PruneResult", "prune", "prune_file", "save_model", "Deviation"]
