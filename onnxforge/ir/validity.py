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
        path.write_bytes(skeleton_proto(model).SerializeToString())
        onnx.checker.check_model(str(path))
