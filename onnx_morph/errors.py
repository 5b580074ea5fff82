"""The one exception family the library raises for bad input; the CLI turns it into exit code 2."""


class OnnxMorphError(Exception):
    """Base of every error caused by the user's input (file, model, option)."""


class ModelLoadError(OnnxMorphError):
    """The model file cannot be read, parsed, validated or shape-inferred."""


class OptionError(OnnxMorphError):
    """An option value is malformed or contradicts the model."""
