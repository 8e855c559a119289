"""Distillation: `distill` trains the compressed model's weights to give the original model's outputs again."""

from __future__ import annotations

from onnxforge.passes.distillation.distill import Distill

__all__ = ["Distill"]
