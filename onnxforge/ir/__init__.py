"""The onnxforge IR: an onnx-graphsurgeon graph with model fields, I/O, shapes and analyses views."""

from onnxforge.ir.graph_view import to_networkx
from onnxforge.ir.io import load_model, save_model
from onnxforge.ir.model import Model, ModelStats
from onnxforge.ir.shapes import ShapeInferenceResult, infer_shapes

__all__ = [
    "Model",
    "ModelStats",
    "ShapeInferenceResult",
    "infer_shapes",
    "load_model",
    "save_model",
    "to_networkx",
]
