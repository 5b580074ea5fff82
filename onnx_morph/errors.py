"""The exceptions the library raises. The CLI turns the user-facing ones (OnnxMorphError) into one
line and exit code 2, and an InvariantError (a bug of onnx-morph, not of the input) into exit code 1
with a request to report it."""


class OnnxMorphError(Exception):
    """Base of every error caused by the user's input, environment or data (file, model, option)."""


class ModelLoadError(OnnxMorphError):
    """The model file cannot be read, parsed, validated or shape-inferred."""


class OptionError(OnnxMorphError):
    """An option value is malformed or contradicts the model. Messages name the Python option
    (`round_to`); the CLI shows its flag (`--round-to`)."""


class OutputError(OnnxMorphError):
    """An output (model, artifacts, report) cannot be written where it was asked to go."""


class TrainingError(OnnxMorphError):
    """Training cannot go on: the loss diverged, or the data does not fit the artifacts."""


class InvariantError(Exception):
    """Something onnx-morph guarantees did not hold: a bug, never the input's fault."""
