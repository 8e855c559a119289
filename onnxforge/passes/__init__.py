"""Passes: the base class, the registry, the pass manager, and the built-in pass families."""

from onnxforge.passes.base import Analysis, Pass, PassContext, PassResult
from onnxforge.passes.manager import Instrument, PassFailedError, PassManager, PassRecord
from onnxforge.passes.registry import available_passes, create_passes, get_pass, load_plugin, register_pass
from onnxforge.passes.verifier import VerifyOptions

__all__ = [
    "Analysis",
    "Instrument",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassManager",
    "PassRecord",
    "PassResult",
    "VerifyOptions",
    "available_passes",
    "create_passes",
    "get_pass",
    "load_plugin",
    "register_pass",
]
