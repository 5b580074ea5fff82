"""Rewrites of the model: surgery (prune, expand, verify, calibrate, save) and training (the regularizer
as ONNX nodes, onnxruntime-training artifacts, gates, batch-flexible exports)."""

from onnx_morph.rewrite.prune import LayerWidth, PruneResult, prune, prune_file
from onnx_morph.rewrite.save import save_model
from onnx_morph.rewrite.verify import Deviation

__all__ = ["LayerWidth", "PruneResult", "prune", "prune_file", "save_model", "Deviation"]
