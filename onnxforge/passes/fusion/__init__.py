"""Fusion passes: make exported graphs as lean as hand-written ones, so backends run fewer, larger kernels.

Every module in this package is imported here, so a new fusion pass needs only its own module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from onnxforge.pipeline.base import CompositePass, Pass
from onnxforge.passes.fusion.base import RuleBasedPass, fusion_passes
from onnxforge.pipeline.registry import register_pass

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


@register_pass("fuse")
class Fuse(CompositePass):
    """Run every fusion pass that applies (operator folding, activations, normalization, attention, ...)."""

    @dataclass
    class Options:
        max_rounds: int = 3

    def members(self) -> list[Pass]:
        return [cls() for cls in fusion_passes()]


__all__ = ["Fuse", "RuleBasedPass", "fusion_passes"]
