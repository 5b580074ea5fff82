"""Rewrites of the model: surgery that removes dead channels (and, later, the training-graph regularizer)."""

from onnx_morph.rewrite.prune import LayerWidth, PruneResult, prune, prune_file
from onnx_morph.rewrite.save import save_model
from onnx_morph.rewrite.verify import Deviation

__all__ = ["LayerWidth", "PruneResult", "prune", "prune_file", "save_model", "Deviation"]
