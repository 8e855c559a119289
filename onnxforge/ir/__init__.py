"""The onnxforge IR: an onnx-graphsurgeon graph with model fields, I/O, shapes and analyses views."""

from onnx_graphsurgeon.logger import G_LOGGER

from onnxforge.ir.graph_view import to_networkx
from onnxforge.ir.io import load_model, save_model
from onnxforge.ir.model import Model, ModelStats
from onnxforge.ir.shapes import ShapeInferenceResult, infer_shapes

# graphsurgeon warns on stdout about what ONNX allows (nodes sharing a name) and about its optional colours;
# onnxforge reports what matters to the user itself.
G_LOGGER.severity = G_LOGGER.ERROR

__all__ = [
    "Model",
    "ModelStats",
    "ShapeInferenceResult",
    "infer_shapes",
    "load_model",
    "save_model",
    "to_networkx",
]
