"""prune: structured channel pruning through the pass interface, on the channel-group test models."""

from __future__ import annotations

import numpy as np
import pytest
from graph_checks import apply, max_rel_error
from test_pruning_channel_groups import MODELS, _exported

from onnxforge import optimize
from onnxforge.errors import PassError
from onnxforge.ir import load_model
from onnxforge.passes.pruning import ChannelGroups
from onnxforge.passes.pruning.prune import channel_importance

PRUNABLE = ["residual", "depthwise", "dense", "conv_head", "ffn"]


@pytest.mark.parametrize("name", PRUNABLE)
def test_ratio_zero_leaves_the_model_and_its_outputs_unchanged(name):
    source = _exported(name, fold_bn=False)
    model, result = apply("prune:ratio=0", source)
    assert not result.changed and result.stats["channels_removed"] == 0
    assert max_rel_error(source, model) == 0


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", PRUNABLE)
def test_half_the_channels_go_and_the_model_stays_valid_and_smaller(name, scope):
    source = _exported(name, fold_bn=True)
    _, report = optimize(source, f"prune:ratio=0.5:scope={scope}", seed=0)
    [record] = report.passes
    assert record.status == "applied", record.error
    assert record.stats["channels_removed"] > 0 and record.after.params < record.before.params


def test_layer_scope_removes_the_ratio_of_every_prunable_group_and_names_the_rest():
    source = _exported("residual", fold_bn=True)
    groups = ChannelGroups.compute(load_model(source))
    prunable = [g for g in groups if g.prunable]
    _, result = apply("prune:ratio=0.5", source)
    assert result.stats["channels_removed"] == sum(g.channels // 2 for g in prunable)
    assert any(": kept: " in note for note in result.notes)  # the head reaches the graph output


def test_the_least_important_channels_go_first():
    source = _exported("ffn", fold_bn=False)
    model = load_model(source)
    [group] = [g for g in ChannelGroups.compute(model) if g.prunable]
    weakest = int(np.argmin(channel_importance(group, "l1")))
    scaled = load_model(source)
    [scaled_group] = [g for g in ChannelGroups.compute(scaled) if g.prunable]
    # Make one channel clearly the most important: it must survive any ratio below 1.
    slot = scaled_group.producers[0]
    values = np.array(slot.tensor.values)
    index = [slice(None)] * values.ndim
    index[slot.axis] = weakest
    values[tuple(index)] *= 1000
    slot.node.inputs[slot.input_index].values = values
    assert int(np.argmax(channel_importance(scaled_group, "l1"))) == weakest


def test_exclude_keeps_a_group_whole():
    source = _exported("ffn", fold_bn=False)
    _, result = apply("prune:ratio=0.5:exclude=MatMul+Gemm", source)
    assert not result.changed and any("excluded" in note for note in result.notes)


@pytest.mark.parametrize("ratio", ["1", "-0.1"])
def test_a_ratio_outside_zero_to_one_is_refused(ratio):
    with pytest.raises(PassError, match="fraction of channels"):
        apply(f"prune:ratio={ratio}", _exported("ffn", fold_bn=False))


def test_every_test_model_is_known():
    assert set(PRUNABLE) <= set(MODELS)
