"""Errors a user can cause.

Every exception here carries a message that says what is wrong (naming the file, field, node or
input) and what to do about it. The CLI prints ``str(err)`` without a traceback and exits with
status 2. Library code raises these; it never prints.
"""


class SparsifyError(Exception):
    """Base class for every error caused by user input (files, recipes, arrays, arguments)."""


class RecipeError(SparsifyError):
    """A recipe that cannot be parsed, validated or applied to the model."""


class CheckpointError(SparsifyError):
    """A checkpoint that is missing, unsafe, or does not fit the model."""


class DataError(SparsifyError):
    """A dataset or model name that is unknown, or data that cannot be read."""


class ExportError(SparsifyError):
    """An export that cannot be produced or fails its checks (no file is left behind)."""


class EngineError(SparsifyError):
    """An ONNX file the engine cannot load or plan."""


class UnsupportedOpError(EngineError):
    """A graph holding ops the engine has no kernel for; the message lists every one."""


class InputError(SparsifyError):
    """Inputs to a run (names, shapes, dtypes) or CLI arguments that do not fit."""
