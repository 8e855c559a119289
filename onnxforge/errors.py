"""Errors a user can cause; the CLI prints them as one `error:` line."""


class OnnxforgeError(Exception):
    """Base of every error caused by user input (bad file, bad option, unloadable model)."""


class ModelLoadError(OnnxforgeError):
    """The model file is missing, truncated, or not ONNX."""


class PassError(OnnxforgeError):
    """An unknown pass, a bad pass option, or a plugin that cannot be loaded."""


class BackendError(OnnxforgeError):
    """A backend cannot load or run the model."""


class DataError(OnnxforgeError):
    """Sample inputs (--data, --shape) do not fit the model."""
