"""The pipeline: what a pass is, the context passes share, the registry, the pass manager and its verifier."""

from onnxforge.pipeline.base import Analysis, CompositePass, LayerDecision, Pass, PassResult, Pipeline
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.manager import Instrument, PassFailedError, PassManager, PassRecord
from onnxforge.pipeline.registry import available_passes, create_passes, get_pass, load_plugin, register_pass
from onnxforge.pipeline.verifier import VerifyOptions

__all__ = [
    "Analysis",
    "CompositePass",
    "Instrument",
    "LayerDecision",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassManager",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "VerifyOptions",
    "available_passes",
    "create_passes",
    "get_pass",
    "load_plugin",
    "register_pass",
]
