"""prune:measure=false: structured channel pruning through the pass interface, on the channel-group test models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from graph_checks import apply, max_rel_error, padded_token_samples
from model_builders import BertLike
from test_pruning_channel_groups import MODELS, _exported

from onnxforge import optimize
from onnxforge.backends import BackendOptions, get_backend
from onnxforge.calibration import recovery
from onnxforge.calibration.observe import observe_tensors
from onnxforge.data import random_inputs
from onnxforge.errors import PassError
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import load_model
from onnxforge.ir.layers import as_layer
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.pipeline import PassContext
from onnxforge.passes.layers import find_layers
from onnxforge.passes.pruning import ChannelGroups
from onnxforge.passes.pruning.importance import channel_importance, input_statistics

PRUNABLE = ["residual", "depthwise", "dense", "conv_head", "ffn", "upsampling"]


@pytest.mark.parametrize("name", PRUNABLE)
def test_ratio_zero_leaves_the_model_and_its_outputs_unchanged(name):
    source = _exported(name, fold_bn=False)
    model, result = apply("prune:measure=false:ratio=0", source)
    assert not result.changed and result.stats["channels_removed"] == 0
    assert max_rel_error(source, model) == 0


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", PRUNABLE)
def test_half_the_channels_go_and_the_model_stays_valid_and_smaller(name, scope):
    source = _exported(name, fold_bn=True)
    _, report = optimize(source, f"prune:measure=false:ratio=0.5:scope={scope}", seed=0, budget=None)
    [record] = report.passes
    assert record.status == "applied", record.error
    assert record.stats["channels_removed"] > 0 and record.after.params < record.before.params


def test_layer_scope_removes_the_ratio_of_every_prunable_group_and_names_the_rest():
    source = _exported("residual", fold_bn=True)
    groups = ChannelGroups.compute(load_model(source))
    prunable = [g for g in groups if g.prunable]
    _, result = apply("prune:measure=false:ratio=0.5:round_to=1", source)
    assert result.stats["channels_removed"] == sum(g.channels // 2 for g in prunable)
    assert any(": kept: " in note for note in result.notes)  # the head reaches the graph output


@pytest.mark.parametrize(("round_to", "kept"), [(8, [32, 16]), (1, [28, 17]), (16, [32, 16])])
def test_groups_keep_a_multiple_of_round_to_channels_and_the_model_computes(round_to, kept):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 24, 3), nn.ReLU(), nn.Conv2d(24, 4, 1))
    source, _ = apply("cleanup", from_torch(module.eval(), torch.randn(1, 3, 12, 12)))
    pruned, result = apply(f"prune:measure=false:ratio=0.3:round_to={round_to}", source)
    convs = [layer.weight.shape[0] for layer in find_layers(pruned.graph)]
    assert convs == [*kept, 4]  # 40 and 24 channels less 30% keep 28 and 17; the output's 4 are kept
    assert any(f"a multiple of round_to={round_to}" in note for note in result.notes) == (round_to > 1)
    outputs = get_backend("ort").prepare(pruned, BackendOptions()).run(random_inputs(source.to_proto(), seed=5))
    assert [output.shape for output in outputs.values()] == [(1, 4, 8, 8)]


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
    _, result = apply("prune:measure=false:ratio=0.5:exclude=MatMul+Gemm", source)
    assert not result.changed and any("excluded" in note for note in result.notes)


@pytest.mark.parametrize(
    ("option", "said"),
    [("ratio=1", "fraction of channels"), ("ratio=-0.1", "fraction of channels"), ("round_to=0", "count of 1 or more")],
)
def test_a_ratio_outside_zero_to_one_or_a_round_to_below_one_is_refused(option, said):
    with pytest.raises(PassError, match=said):
        apply(f"prune:measure=false:{option}", _exported("ffn", fold_bn=False))


def test_every_test_model_is_known():
    assert set(PRUNABLE) <= set(MODELS)


def _weights(model) -> dict[str, np.ndarray]:
    return {n.name: np.asarray(n.inputs[1].values) for n in model.graph.nodes if n.op in ("Conv", "MatMul", "Gemm")}


def test_two_of_four_zeros_two_of_every_four_inputs_and_says_it_does_not_speed_up_dense_kernels():
    source = _exported("ffn", fold_bn=False)
    model, result = apply("prune:measure=false:structure=2:4", source)
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
    model, result = apply(f"prune:measure=false:structure=unstructured:ratio={ratio}", source)
    assert result.changed == (ratio > 0)
    for name, weight in _weights(model).items():
        original = before[name]
        assert weight.shape == original.shape
        assert abs(np.mean(weight == 0) - ratio) < 0.02
        kept = weight != 0
        if ratio:  # every zeroed weight is no larger than any kept one
            assert np.abs(original[~kept]).max() <= np.abs(original[kept]).min()


@pytest.mark.parametrize("name", PRUNABLE)
def test_recovery_reduces_the_output_error_on_held_out_inputs(name):
    source = _exported(name, fold_bn=True)
    # Enough samples for the Gemm after a Flatten: one row per sample, one unknown per kept feature.
    calibration, held_out = _random_samples(source, 160, seed=1), _random_samples(source, 8, seed=1000)
    # Groups of these models have 6 to 12 channels: exact counts, or most would keep all 8 of round_to=8.
    plain, _ = apply("prune:measure=false:ratio=0.5:round_to=1", source)
    recovered, result = apply("prune:measure=false:ratio=0.5:round_to=1:recover=true", source, data=calibration)
    assert any(note.startswith("recovery: ") for note in result.notes)
    plain_error = relative_error(source, plain, held_out)
    assert relative_error(source, recovered, held_out) < plain_error


def test_recovery_says_when_its_calibration_rows_are_few_for_the_weights_it_fits():
    source = _exported("ffn", fold_bn=True)  # 10 rows a sample; the down projection keeps 8 inputs and a bias
    for count, said in ((2, ["(fewest: 20 rows for 9)"]), (40, [])):
        _, result = apply("prune:measure=false:ratio=0.5:recover=true", source, data=_random_samples(source, count, 1))
        notes = [note for note in result.notes if "more --data samples would" in note]
        assert [text for text in said for note in notes if text in note] == said and len(notes) == len(said), notes


def correlated_channels() -> onnx.ModelProto:
    """Linear(8, 16), ReLU, Linear(16, 4) on 32 rows: hidden channels 2k and 2k+1 (k < 4) are copies, 8-15 are
    weaker single channels. Importance keeps both copies of each pair; after a refit one copy does the work of two."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        up = module[0].weight
        up[1:8:2] = up[0:8:2]
        up[8:] *= 0.5
    model, _ = apply("cleanup", from_torch(module, torch.randn(1, 32, 8)))
    return model.to_proto()


def test_recovery_keeps_the_channels_whose_refit_best_reproduces_the_readers():
    source = correlated_channels()
    # 21 samples: the pass fits on the first 16 and holds the last 5 out (the run's one split).
    calibration, held_out = _random_samples(source, 21, seed=1), _random_samples(source, 8, seed=1000)
    errors = {}
    for select in ("importance", "refit"):
        passes = f"prune:measure=false:ratio=0.5:method=taylor-free:recover=true:select={select}"
        model, result = apply(passes, source, data=calibration)
        errors[select] = relative_error(source, model, held_out)
        assert any("16 -> 8 channels" in note for note in result.notes)
    assert any("kept for the refit" in note for note in result.notes)
    assert errors["refit"] < 0.7 * errors["importance"], errors  # seen: 0.16 against 0.30


def saturating_head() -> onnx.ModelProto:
    """Linear(8, 16), ReLU, Linear(16, 1), Sigmoid, with logits mostly far from 0 (a detector's probability map)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid()).eval()
    with torch.no_grad():
        module[2].weight *= 20
    model, _ = apply("cleanup", from_torch(module, torch.randn(1, 64, 8)))
    return model.to_proto()


def test_recovery_fits_a_layer_read_by_a_sigmoid_after_the_sigmoid(monkeypatch):
    source = saturating_head()
    calibration, held_out = _random_samples(source, 16, seed=1), _random_samples(source, 8, seed=1000)
    passes = "prune:measure=false:ratio=0.5:method=taylor-free:recover=true"
    through_sigmoid, _ = apply(passes, source, data=calibration)
    monkeypatch.setattr(recovery, "SIGMOID_WORK", 0)  # no layer is affordable: the logits are fitted linearly
    on_logits, _ = apply(passes, source, data=calibration)
    error, linear_error = relative_error(source, through_sigmoid, held_out), relative_error(source, on_logits, held_out)
    assert error < 0.95 * linear_error, (error, linear_error)  # seen: 0.39 against 0.44


class MaskedFeedForward(nn.Module):
    """Linear(8, 16), ReLU, Linear(16, 8) on [1, 12, 8] tokens, with an attention mask it only passes on."""

    def __init__(self):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x, attention_mask):
        return self.ffn(x), attention_mask.float()


@pytest.mark.parametrize("select", ["importance", "refit"])
def test_importance_and_recovery_read_only_the_tokens_the_attention_mask_marks_real(select):
    torch.manual_seed(0)
    example = (torch.randn(1, 12, 8), torch.ones(1, 12, dtype=torch.int64))
    source, _ = apply("cleanup", from_torch(MaskedFeedForward().eval(), example, input_names=["x", "attention_mask"]))
    samples, garbled = padded_token_samples(16, 8, seed=3)
    passes = f"prune:measure=false:ratio=0.5:method=taylor-free:recover=true:select={select}"
    pruned = [apply(passes, source, data=data)[0] for data in (samples, garbled)]
    weights = [[np.asarray(layer.weight.values) for layer in find_layers(model.graph)] for model in pruned]
    assert weights[0][0].shape == (8, 8) and all(np.allclose(a, b, atol=1e-5) for a, b in zip(*weights))


def test_recovery_needs_data():
    with pytest.raises(PassError, match="give them with --data"):
        apply("prune:measure=false:ratio=0.5:recover=true", _exported("ffn", fold_bn=False))


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
        pruned[form], result = apply("prune:measure=false:ratio=0.5", source)
        assert sum("4 -> 2 heads" in note for note in result.notes) == 2, result.notes
        counts = {n.attrs["num_heads"] for n in pruned[form].graph.nodes if n.op == "Attention"}
        assert counts == ({2} if form == "fused" else set())
    # Same heads removed from the same weights: the two pruned models compute the same function.
    assert max_rel_error(pruned["unfused"].to_proto(), pruned["fused"]) < 1e-4
    assert max_rel_error(bert_like["unfused"], pruned["unfused"]) > 0.01  # and it did change
    # The pruned exported attention still fuses, with the new head count.
    fused_after, _ = apply("fuse", pruned["unfused"])
    assert [n.attrs["num_heads"] for n in fused_after.graph.nodes if n.op == "Attention"] == [2, 2]


def test_recovery_keeps_the_most_important_heads_and_the_channels_best_for_the_refit(bert_like):
    source = bert_like["unfused"]
    calibration = _random_samples(source, 8, seed=1)
    _, result = apply("prune:measure=false:ratio=0.5:method=taylor-free:recover=true", source, data=calibration)
    heads = [note for note in result.notes if "4 -> 2 heads" in note]
    channels = [note for note in result.notes if "128 -> 64 channels" in note]
    assert len(heads) == 2 and all(note.endswith("(taylor-free)") for note in heads), result.notes
    assert len(channels) == 2 and all(note.endswith("(taylor-free; kept for the refit)") for note in channels)


def test_recovery_refits_the_biases_and_residual_sums_that_fused_transformer_ops_hold(bert_like):
    """After fusion a layer's bias sits in BiasGelu or SkipLayerNormalization, which also adds the residual: the
    refit changes those biases, and fits the layers before a SkipLayerNormalization to the sum it takes."""
    model = load_model(bert_like["fused"])
    layers = [node for node in model.graph.nodes if recovery.refittable(node) and node.op == "MatMul"]
    holders = [(as_layer(node).bias[0].op, recovery._residual_addend(node) is not None) for node in layers]
    assert holders == [("SkipLayerNormalization", True), ("BiasGelu", False), ("SkipLayerNormalization", True)] * 2
    calibration, samples = PassContext(backend="ort").calibration, _random_samples(bert_like["fused"], 2, seed=4)
    targets = recovery.layer_targets(model, layers, samples, calibration, residual=True)
    for node in layers:
        skip = recovery._residual_addend(node)
        seen = {}
        observe_tensors(model, [node.outputs[0].name, *[skip] * bool(skip)], samples[:1], calibration, seen.setdefault)
        wanted = sum(value.reshape(-1, value.shape[-1]) for value in seen.values())[targets[id(node)].positions[0]]
        assert np.allclose(targets[id(node)].rows[0], wanted, atol=1e-5), node.name

    calibration, held_out = _random_samples(bert_like["fused"], 24, seed=5), _random_samples(bert_like["fused"], 8, 99)
    options = "prune:measure=false:ratio=0.5:method=taylor-free"
    plain, _ = apply(options, bert_like["fused"], data=calibration)
    recovered, _ = apply(options + ":recover=true", bert_like["fused"], data=calibration)
    def biases(graph_model) -> dict[str, np.ndarray]:
        found = [as_layer(node).bias for node in graph_model.graph.nodes if node.op == "MatMul"]
        return {holder.name: holder.inputs[index].values for holder, index in filter(None, found)}

    before, after = biases(model), biases(recovered)
    assert len(after) == 6 and all(not np.array_equal(after[name], before[name]) for name in after)
    error = {name: relative_error(bert_like["fused"], m, held_out) for name, m in (("plain", plain), ("re", recovered))}
    assert error["re"] < 0.7 * error["plain"], error


def test_ratio_zero_leaves_heads_unchanged(bert_like):
    model, result = apply("prune:measure=false:ratio=0", bert_like["fused"])
    assert not result.changed and max_rel_error(bert_like["fused"], model) == 0


@pytest.mark.parametrize("name", ["upsampling", "conv_head", "ffn", "residual"])
def test_recovery_design_rows_times_the_weights_give_each_layers_output(name):
    """The least-squares problem recovery solves is exact at the current weights, for every layer it refits."""
    model = load_model(_exported(name, fold_bn=True))
    calibration = PassContext(backend="ort").calibration
    sample = _random_samples(model.to_proto(), 1, seed=3)
    layers = [node for node in model.graph.nodes if recovery.refittable(node)]
    assert layers
    for node in layers:
        seen = {}
        names = [node.inputs[0].name, node.outputs[0].name]
        observe_tensors(model, names, sample, calibration, lambda tensor, value: seen.setdefault(tensor, value))
        (weights, with_bias), output = recovery.design_weights(node), seen[names[1]]
        y = as_layer(node).output_rows(output)
        x = recovery.design_rows(node, seen[names[0]], np.arange(len(y)), output.shape, with_bias)
        assert np.allclose(x @ weights, y, rtol=1e-4, atol=1e-4), node.name
        # matrix_rows names the design columns that read an input channel: zeroing the channel zeroes just those.
        silenced = seen[names[0]].copy()
        channels = np.moveaxis(silenced, 1 if node.op in ("Conv", "ConvTranspose") else -1, 0)  # a view
        channel = int(np.argmax(np.abs(channels).reshape(len(channels), -1).sum(1)))  # one that is not all 0
        channels[channel] = 0
        columns = as_layer(node).matrix_rows(np.array([channel]))
        changed = x != recovery.design_rows(node, silenced, np.arange(len(y)), output.shape, with_bias)
        assert set(np.flatnonzero(changed.any(0))) <= set(columns) and changed[:, columns].any(), node.name


# --- measured speed and the per-layer report -------------------------------------------------------------


def wide_cnn() -> onnx.ModelProto:
    """Three 3x3 Convs of 64 channels on 32x32: halving their channels cuts the work about 3 times."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    module = nn.Sequential(*layers, nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1)).eval()
    model, _ = apply("cleanup", from_torch(module, torch.randn(1, 3, 32, 32)))
    return model.to_proto()


def test_pruning_reports_each_layers_size_and_the_measured_speed():
    # The pass manager times the pruned model: prune declares min_speedup as its acceptance.
    _, report = optimize(wide_cnn(), "prune:ratio=0.5", seed=0, budget=None)
    (record,) = report.passes
    assert record.status == "applied" and record.stats["measured_speedup"] > 1.2  # in fact about 3x: wide margin
    conv_lines = [note for note in record.notes if note.startswith("Conv ")]
    assert len(conv_lines) == 4  # every Conv reads or makes pruned channels
    assert "params 1792 -> 896, MACs 1.8M -> 884.7K (2.00x fewer)" in conv_lines[0]  # 64 -> 32 outputs of 3x3x3
    assert "(4.00x fewer)" in conv_lines[1]  # 64 -> 32 inputs and outputs
    assert any(note.startswith("all 4 layers changed: ") for note in record.notes)
    assert any(note.startswith("whole model measured ") for note in record.notes)


def test_a_pruned_model_below_min_speedup_is_not_kept():
    source = wide_cnn()
    model, report = optimize(source, "prune:ratio=0.5:min_speedup=100", seed=0, budget=None)
    (record,) = report.passes
    assert record.status == "unchanged" and record.stats["measured_speedup"] < 100
    assert record.stats["params_removed"] == 0 and record.after == record.before
    assert record.notes[-2].startswith("timed again: ") and "left as it was" in record.notes[-1]
    assert max_rel_error(source, model) == 0


# --- importance from data --------------------------------------------------------------------------------


def _set(slot, values) -> None:
    slot.node.inputs[slot.input_index].values = np.asarray(values, np.float32)


def test_data_importance_sees_channels_that_weights_misjudge():
    source = _exported("ffn", fold_bn=False)
    model = load_model(source)
    [group] = [g for g in ChannelGroups.compute(model) if g.prunable]
    [producer], [consumer], [bias] = group.producers, group.consumers, group.followers
    dead, unread = np.argsort(channel_importance(group, "l1"))[:2]
    up = np.array(producer.tensor.values)
    up[:, [dead, unread]] *= 100  # both now have the largest weights...
    _set(producer, up)
    shift = np.array(bias.tensor.values)
    shift[dead] = -1e4  # ...but GELU zeroes one of them on every input
    _set(bias, shift)
    down = np.array(consumer.tensor.values)
    down[unread] = 0  # ...and the next layer ignores the other
    _set(consumer, down)
    samples = _random_samples(source, 8, seed=7)
    statistics = input_statistics(model, [group], samples, PassContext(backend="ort").calibration)
    assert set(np.argsort(channel_importance(group, "l1"))[-2:]) == {dead, unread}
    activation = channel_importance(group, "activation", statistics)
    assert np.argmin(activation) == dead and activation[dead] < 1e-6
    taylor = channel_importance(group, "taylor-free", statistics)
    assert taylor[dead] < 1e-6 and taylor[unread] == 0


@pytest.mark.parametrize("method", ["activation", "taylor-free"])
def test_data_methods_prune_and_need_data(method):
    source = _exported("residual", fold_bn=True)
    with pytest.raises(PassError, match="give samples with --data"):
        apply(f"prune:measure=false:method={method}", source)
    model, result = apply(f"prune:measure=false:method={method}:ratio=0.5", source, data=_random_samples(source, 4, 1))
    assert result.changed and any(f"({method})" in note for note in result.notes)
