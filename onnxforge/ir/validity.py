"""Structural validity of a model (onnx.checker), without reading its weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from onnxforge.ir.model import Model
from onnxforge.ir.shapes import SKELETON_DATA, skeleton_proto


def check_model(model: Model) -> None:
    """Run onnx.checker on the model; raise onnx.checker.ValidationError when it is not valid ONNX.

    Large weights are not read or written: the checker sees them as references to an empty file.
    """
    with tempfile.TemporaryDirectory(prefix="onnxforge-check-") as tmp:
        folder = Path(tmp)
        (folder / SKELETON_DATA).touch()
        path = folder / "model.onnx"
        proto = skeleton_proto(model)
        _declare_missing_shapes(proto.graph)
        path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path))


def _declare_missing_shapes(graph: onnx.GraphProto) -> None:
    """Give main-graph inputs and outputs declared without a shape an empty one, for the checker only.

    The checker insists on the field there, while onnxruntime and shape inference take a tensor without one
    as "shape unknown"; converters and quantizers write such outputs, and shape inference cannot fill them in
    through ops it does not know (onnxruntime's quantized contrib ops), so no pass could make such a model pass.
    """
    for value in (*graph.input, *graph.output):
        if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.SetInParent()
