"""Cleanup passes: the lossless simplifications every model gets before anything else."""

from __future__ import annotations

from dataclasses import dataclass

from onnxforge.pipeline.base import CompositePass, Pass
from onnxforge.passes.cleanup.constant_folding import FoldConstants
from onnxforge.passes.cleanup.dead_code import RemoveDeadCode
from onnxforge.passes.cleanup.identity import RemoveIdentity
from onnxforge.passes.cleanup.initializer_merging import MergeDuplicateInitializers
from onnxforge.passes.cleanup.opset_upgrade import UpgradeOpset
from onnxforge.passes.cleanup.set_shapes import SetShapes
from onnxforge.passes.cleanup.shape_folding import FoldShapes
from onnxforge.pipeline.registry import register_pass

__all__ = [
    "Cleanup",
    "FoldConstants",
    "FoldShapes",
    "MergeDuplicateInitializers",
    "RemoveDeadCode",
    "RemoveIdentity",
    "SetShapes",
    "UpgradeOpset",
]


@register_pass("cleanup")
class Cleanup(CompositePass):
    """Remove dead code and Identity nodes, fold constants and static shapes, merge duplicate weights."""

    @dataclass
    class Options:
        max_rounds: int = 4
        # See fold-constants: the largest folded result kept as a weight (None: the largest existing weight).
        max_bytes: int | None = None
        # See fold-constants: how many bytes folding may add to the weights (None: any).
        max_growth: int | None = 0

    def members(self) -> list[Pass]:
        return [
            RemoveIdentity(),
            FoldShapes(),
            FoldConstants(max_bytes=self.options.max_bytes, max_growth=self.options.max_growth),
            MergeDuplicateInitializers(),
            RemoveDeadCode(),
        ]
