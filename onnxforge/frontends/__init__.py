"""Frontends: where models come from (ONNX files and protos, PyTorch modules)."""

from onnxforge.frontends.onnx import ModelFile, from_onnx

__all__ = ["ModelFile", "from_onnx", "from_torch"]


def __getattr__(name: str):
    # torch is an optional extra: import it only when asked for.
    if name == "from_torch":
        from onnxforge.frontends.torch import from_torch

        return from_torch
    raise AttributeError(name)
