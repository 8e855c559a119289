"""The ONNX frontend: a model file (external data included), serialized bytes, or a ModelProto."""

from __future__ import annotations

import os

import onnx

from onnxforge.ir import Model, load_model


def from_onnx(source: str | os.PathLike | onnx.ModelProto | bytes | Model) -> Model:
    """Return the IR model for an ONNX source; a Model is returned as it is."""
    if isinstance(source, Model):
        return source
    return load_model(source)
