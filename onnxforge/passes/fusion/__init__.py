"""Fusion passes: make exported graphs as lean as hand-written ones, so backends run fewer, larger kernels.

`FUSION_STAGES` lists the passes `fuse` runs, in the order it runs them; a plugin puts its own pass among
them with `add_fusion_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxforge.errors import PassError
from onnxforge.passes.fusion.activations import FuseActivations
from onnxforge.passes.fusion.attention import FuseAttention
from onnxforge.passes.fusion.base import RuleBasedPass
from onnxforge.passes.fusion.batchnorm import FoldBatchNorm, FoldScaleIntoConv
from onnxforge.passes.fusion.cse import EliminateCommonSubexpressions
from onnxforge.passes.fusion.layout import SimplifyLayout
from onnxforge.passes.fusion.linear import FuseMatMulAdd
from onnxforge.passes.fusion.normalization import FuseNormalization
from onnxforge.passes.fusion.transformer import FuseBiasGelu, FuseSkipLayerNorm
from onnxforge.pipeline.base import CompositePass, Pass
from onnxforge.pipeline.registry import register_pass

# The passes `fuse` runs, in this order, each round.
FUSION_STAGES: list[type[Pass]] = [
    EliminateCommonSubexpressions,  # the shape arithmetic exporters repeat in every layer, once
    SimplifyLayout,
    FoldBatchNorm,
    FoldScaleIntoConv,
    FuseNormalization,  # LayerNormalization, which fuse-skip-layernorm takes
    FuseActivations,  # Gelu, which fuse-bias-gelu takes
    FuseAttention,
    FuseBiasGelu,
    FuseSkipLayerNorm,
    FuseMatMulAdd,  # after fuse-bias-gelu: a bias Add taken into a Gemm is no longer BiasGelu's to take
]


def add_fusion_stage(stage: type[Pass], after: type[Pass]) -> None:
    """Run `stage` (a registered pass) inside `fuse` right after the stage `after`; a stage of the same name
    (a plugin loaded again) is replaced."""
    if after not in FUSION_STAGES:
        raise PassError(f"'{after.name}' is not a fusion stage (known: {', '.join(s.name for s in FUSION_STAGES)})")
    FUSION_STAGES[:] = [s for s in FUSION_STAGES if s.name != stage.name]
    FUSION_STAGES.insert(FUSION_STAGES.index(after) + 1, stage)


@register_pass("fuse")
class Fuse(CompositePass):
    """Run every fusion pass that applies (operator folding, activations, normalization, attention, ...)."""

    @dataclass
    class Options:
        max_rounds: int = 3

    def members(self) -> list[Pass]:
        return [stage() for stage in FUSION_STAGES]


__all__ = ["FUSION_STAGES", "Fuse", "RuleBasedPass", "add_fusion_stage"]
