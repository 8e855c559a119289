"""The ONNX frontend: a model file (external data included), serialized bytes, or a ModelProto."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxforge.ir import Model, load_model


@dataclass(frozen=True)
class ModelFile:
    """A model file loaded once: its path (what a runtime loads as the baseline) and the IR model read from it."""

    path: Path
    model: Model

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelFile:
        return cls(Path(path), load_model(path))


def from_onnx(source: str | os.PathLike | onnx.ModelProto | bytes | Model | ModelFile) -> Model:
    """Return the IR model for an ONNX source; a Model is returned as it is."""
    if isinstance(source, Model):
        return source
    if isinstance(source, ModelFile):
        return source.model
    return load_model(source)
