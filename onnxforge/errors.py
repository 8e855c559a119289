"""Errors a user can cause; the CLI prints them as one `error:` line."""


class OnnxforgeError(Exception):
    """Base of every error caused by user input (bad file, bad option, unloadable model)."""


class ModelLoadError(OnnxforgeError):
    """The model file is missing, truncated, or not ONNX."""


class PassError(OnnxforgeError):
    """An unknown pass, a bad pass option, a plugin that cannot be loaded, or a model a pass cannot handle.

    Raised from a running pass, the pass is rolled back and the run goes on.
    """


class PassUsageError(PassError):
    """A pass was asked for what it cannot do with any model: options that do not fit together, or data it
    needs but was not given. Raised from a running pass, it stops the run: no rollback fixes the request."""


class BackendError(OnnxforgeError):
    """A backend cannot load or run the model."""


class DataError(OnnxforgeError):
    """Sample inputs (--data, --shape) do not fit the model."""


class DecisionsError(PassUsageError):
    """Decisions to replay (--decisions) that cannot be used: not a report, or lacking a decision the run needs.

    Raised from a running pass, it stops the run: measuring instead would break the promise of the same model.
    """
