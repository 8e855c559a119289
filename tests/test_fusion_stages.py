"""The stages `fuse` runs: one ordered list, which a plugin's pass joins at a chosen place."""

import pytest

from onnxforge.errors import PassError
from onnxforge.passes.fusion import FUSION_STAGES, Fuse, RuleBasedPass, add_fusion_stage
from onnxforge.pipeline.registry import available_passes

# The order `fuse` has run its stages in since they were placed by numbers (5, 10, 20, 21, 30, 40, 50, 60, 60, 70).
ORDER = [
    "cse",
    "simplify-layout",
    "fold-batchnorm",
    "fold-scale-into-conv",
    "fuse-normalization",
    "fuse-activations",
    "fuse-attention",
    "fuse-bias-gelu",
    "fuse-skip-layernorm",
    "fuse-matmul-add",
]


def test_fuse_runs_the_stages_of_the_list_in_its_order():
    assert [stage.name for stage in FUSION_STAGES] == ORDER
    assert [member.name for member in Fuse().members()] == ORDER


def test_every_stage_is_a_registered_pass_and_every_built_in_rule_pass_is_a_stage():
    passes = available_passes()
    assert all(passes[stage.name] is stage for stage in FUSION_STAGES)
    rule_passes = {name: cls for name, cls in passes.items() if issubclass(cls, RuleBasedPass)}
    built_in = {name for name, cls in rule_passes.items() if cls.__module__.startswith("onnxforge.")}
    assert built_in <= set(ORDER)


class _Extra(RuleBasedPass):
    """A stage a plugin would add (not registered: the test only places it)."""

    name = "test-extra-stage"


class _ExtraLoadedAgain(RuleBasedPass):
    name = "test-extra-stage"


def test_a_plugin_stage_runs_right_after_the_stage_it_names_and_loading_it_again_replaces_it():
    before = list(FUSION_STAGES)
    stages = {stage.name: stage for stage in FUSION_STAGES}
    try:
        add_fusion_stage(_Extra, after=stages["fuse-activations"])
        add_fusion_stage(_ExtraLoadedAgain, after=stages["fuse-activations"])
        names = [member.name for member in Fuse().members()]
        assert names == ORDER[:6] + ["test-extra-stage"] + ORDER[6:]
        assert _ExtraLoadedAgain in FUSION_STAGES and _Extra not in FUSION_STAGES
    finally:
        FUSION_STAGES[:] = before


def test_a_stage_cannot_follow_a_pass_that_is_not_a_stage():
    with pytest.raises(PassError, match="'test-extra-stage' is not a fusion stage"):
        add_fusion_stage(_ExtraLoadedAgain, after=_Extra)
    assert [stage.name for stage in FUSION_STAGES] == ORDER
