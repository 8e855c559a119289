"""onnxforge: compiler-style optimization of trained neural networks, measured on the target."""

__version__ = "0.1.0"

from onnxforge.api import measure_model, optimize  # noqa: E402
from onnxforge.errors import OnnxforgeError  # noqa: E402
from onnxforge.ir import Model, load_model, save_model  # noqa: E402
from onnxforge.passes import Pass, PassContext, PassManager, PassResult, register_pass  # noqa: E402

__all__ = [
    "Model",
    "OnnxforgeError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "__version__",
    "load_model",
    "measure_model",
    "optimize",
    "register_pass",
    "save_model",
]
