"""onnxforge: compiler-style optimization of trained neural networks, measured on the target."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# No network access of our own accord: onnxruntime's telemetry writes a device id under ~/.cache, a session
# file in the temporary folder and uploads events unless this is set before onnxruntime is first imported.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

# The public names and the modules they live in, imported on first use: `import onnxforge.cli` then loads no
# numpy, onnx or onnxruntime, so the commands start (and take over Ctrl-C) at once.
_EXPORTS = {
    "Model": "onnxforge.ir",
    "OnnxforgeError": "onnxforge.errors",
    "Pass": "onnxforge.pipeline",
    "PassContext": "onnxforge.pipeline",
    "PassManager": "onnxforge.pipeline",
    "PassResult": "onnxforge.pipeline",
    "load_model": "onnxforge.ir",
    "measure_model": "onnxforge.api",
    "optimize": "onnxforge.api",
    "register_pass": "onnxforge.pipeline",
    "save_model": "onnxforge.ir",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # `x as x`: re-exported (`__all__` above is built at run time, so linters cannot read it)
    from onnxforge.api import measure_model as measure_model, optimize as optimize
    from onnxforge.errors import OnnxforgeError as OnnxforgeError
    from onnxforge.ir import Model as Model, load_model as load_model, save_model as save_model
    from onnxforge.pipeline import Pass as Pass, PassContext as PassContext, PassManager as PassManager
    from onnxforge.pipeline import PassResult as PassResult, register_pass as register_pass


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnxforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
