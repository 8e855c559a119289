"""prune: structured channel pruning through the pass interface, on the channel-group test models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from graph_checks import apply, max_rel_error
from model_builders import BertLike
from test_pruning_channel_groups import MODELS, _exported

from onnxforge import optimize
from onnxforge.backends import BackendOptions, get_backend
from onnxforge.data import random_inputs
from onnxforge.errors import PassError
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import load_model
from onnxforge.ir.shapes import skeleton_proto
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


def _weights(model) -> dict[str, np.ndarray]:
    return {n.name: np.asarray(n.inputs[1].values) for n in model.graph.nodes if n.op in ("Conv", "MatMul", "Gemm")}


def test_two_of_four_zeros_two_of_every_four_inputs_and_says_it_does_not_speed_up_dense_kernels():
    source = _exported("ffn", fold_bn=False)
    model, result = apply("prune:structure=2:4", source)
    assert result.changed and result.stats["sparsity"] == 0.5
    for name, weight in _weights(model).items():
        groups = np.moveaxis(weight, 0, -1).reshape(-1, 4)  # MatMul weights: inputs along axis 0
        assert np.all(np.count_nonzero(groups, axis=1) <= 2), name
    assert "dense CPU kernels" in result.notes[0]
    assert max_rel_error(source, model) < 1.0  # lossy: half the weights are gone, but it still runs


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7])
def test_unstructured_zeros_the_smallest_weights_of_each_layer(ratio):
    source = _exported("conv_head", fold_bn=True)
    before = _weights(load_model(source))
    model, result = apply(f"prune:structure=unstructured:ratio={ratio}", source)
    assert result.changed == (ratio > 0)
    for name, weight in _weights(model).items():
        original = before[name]
        assert weight.shape == original.shape
        assert abs(np.mean(weight == 0) - ratio) < 0.02
        kept = weight != 0
        if ratio:  # every zeroed weight is no larger than any kept one
            assert np.abs(original[~kept]).max() <= np.abs(original[kept]).min()


@pytest.mark.parametrize("name", ["ffn", "conv_head", "residual", "depthwise", "dense"])
def test_recovery_reduces_the_output_error_on_held_out_inputs(name):
    source = _exported(name, fold_bn=True)
    # Enough samples for the Gemm after a Flatten: one row per sample, one unknown per kept feature.
    calibration, held_out = _random_samples(source, 160, seed=1), _random_samples(source, 8, seed=1000)
    plain, _ = apply("prune:ratio=0.5", source)
    recovered, result = apply("prune:ratio=0.5:recover=true", source, data=calibration)
    assert any(note.startswith("recovery: ") for note in result.notes)
    plain_error = relative_error(source, plain, held_out)
    assert relative_error(source, recovered, held_out) < plain_error


def test_recovery_needs_data():
    with pytest.raises(PassError, match="give them with --data"):
        apply("prune:ratio=0.5:recover=true", _exported("ffn", fold_bn=False))


def _random_samples(proto, count: int, seed: int) -> list[dict]:
    skeleton = skeleton_proto(load_model(proto))
    return [random_inputs(skeleton, seed=seed + i) for i in range(count)]


def relative_error(source, model, samples) -> float:
    """||new - old|| / ||old|| over all outputs and samples."""
    options = BackendOptions(graph_optimization="disable")
    before, after = get_backend("ort").prepare(source, options), get_backend("ort").prepare(model, options)
    squared_error = squared_norm = 0.0
    for sample in samples:
        for name, old in before.run(sample).items():
            new = after.run(sample)[name]
            squared_error += float(np.sum((new.astype(np.float64) - old) ** 2))
            squared_norm += float(np.sum(old.astype(np.float64) ** 2))
    return (squared_error / squared_norm) ** 0.5


# --- attention heads -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_like() -> dict[str, onnx.ModelProto]:
    """A two-layer BERT-like encoder (4 heads of 8) after cleanup, with attention as exported and fused."""
    torch.manual_seed(0)
    module = BertLike().eval()
    ids, mask = torch.randint(0, 32, (1, 16)), torch.ones(1, 16, dtype=torch.int64)
    exported = from_torch(module, (ids, mask), input_names=["input_ids", "attention_mask"])
    unfused, _ = apply("cleanup", exported)
    fused, _ = apply("fuse", unfused)
    assert "Attention" in {n.op for n in fused.graph.nodes}
    return {"unfused": unfused.to_proto(), "fused": fused.to_proto()}


@pytest.mark.parametrize("form", ["unfused", "fused"])
def test_each_layers_attention_heads_are_one_group(bert_like, form):
    groups = ChannelGroups.compute(load_model(bert_like[form]))
    heads = [g for g in groups if g.unit == "heads"]
    assert len(heads) == 2 and all(g.prunable and g.channels == 4 for g in heads)
    for group in heads:
        # The Q, K and V weights (three MatMuls, or the three parts of the packed weight) hold 8 columns a head.
        assert len(group.producers) == 3 and {s.repeat for s in group.producers} == {8}
        assert [s.node.op for s in group.consumers] == ["MatMul"]  # the output projection, 8 rows a head
        if form == "unfused":  # the three reshapes to heads and the one back state the head count
            assert sorted(c.node.op for c in group.counts) == ["Reshape"] * 4
        else:
            assert [(c.node.op, c.attribute) for c in group.counts] == [("Attention", "num_heads")]


def test_pruning_heads_gives_the_same_model_whether_or_not_attention_was_fused(bert_like):
    pruned = {}
    for form, source in bert_like.items():
        pruned[form], result = apply("prune:ratio=0.5", source)
        assert sum("4 -> 2 heads" in note for note in result.notes) == 2, result.notes
        counts = {n.attrs["num_heads"] for n in pruned[form].graph.nodes if n.op == "Attention"}
        assert counts == ({2} if form == "fused" else set())
    # Same heads removed from the same weights: the two pruned models compute the same function.
    assert max_rel_error(pruned["unfused"].to_proto(), pruned["fused"]) < 1e-4
    assert max_rel_error(bert_like["unfused"], pruned["unfused"]) > 0.01  # and it did change


def test_ratio_zero_leaves_heads_unchanged(bert_like):
    model, result = apply("prune:ratio=0", bert_like["fused"])
    assert not result.changed and max_rel_error(bert_like["fused"], model) == 0
