"""onnx-morph: MorphNet resource-constrained structure learning for ONNX models."""

from onnx_morph.errors import InvariantError, ModelLoadError, OnnxMorphError, OptionError, OutputError, TrainingError

__version__ = "0.1.0"


def analyze(*args, **kwargs):
    """See onnx_morph.analysis.analyze (imported lazily to keep `import onnx_morph` light)."""
    from onnx_morph.analysis import analyze as _analyze

    return _analyze(*args, **kwargs)


__all__ = [
    "analyze", "InvariantError", "ModelLoadError", "OnnxMorphError", "OptionError", "OutputError", "TrainingError",
    "__version__",
]
