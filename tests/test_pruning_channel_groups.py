"""Channel groups for pruning: which channels go together, and that removing them leaves a valid, consistent model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from graph_checks import apply, max_rel_error
from torch import nn

from onnxforge.backends import BackendOptions, get_backend
from onnxforge.data import random_inputs
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import Model, load_model
from onnxforge.ir.edit import make_constant
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.pipeline import PassContext
from onnxforge.passes.pruning import ChannelGroup, ChannelGroups, remove_channels

RTOL = 1e-5


class ResidualBlocks(nn.Module):
    """A stem and two residual blocks whose outputs are added to the stem's, then a pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a1, self.a1_bn = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b1, self.b1_bn = nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)
        self.a2, self.a2_bn = nn.Conv2d(8, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.b2, self.b2_bn = nn.Conv2d(5, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.b1_bn(self.b1(torch.relu(self.a1_bn(self.a1(x))))))
        x = torch.relu(x + self.b2_bn(self.b2(torch.relu(self.a2_bn(self.a2(x))))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DepthwiseSeparable(nn.Module):
    """Pointwise, depthwise and pointwise Convs with BatchNorm and ReLU, then a pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.pw1, self.pw1_bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.dw_bn = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw_bn(self.dw(torch.relu(self.pw1_bn(self.pw1(x))))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.pw2(x)), 1), 1))


class DenseBlock(nn.Module):
    """DenseNet style: a Conv's output concatenated with the next Conv's, then BatchNorm, ReLU and a Conv."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.bn, self.conv2 = nn.BatchNorm2d(7), nn.Conv2d(7, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = torch.relu(self.conv0(x))
        x = torch.cat([x0, torch.relu(self.conv1(x0))], 1)
        x = torch.relu(self.conv2(torch.relu(self.bn(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConvHead(nn.Module):
    """A strided Conv, BatchNorm and ReLU flattened into a Linear classifier: each channel owns 4*4 features."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv_bn = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv_bn(self.conv(x))), 1))


class GroupedConvs(nn.Module):
    """A depthwise Conv with channel multiplier 2, then a Conv of 2 groups that reads across several channels."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.pw2 = nn.Conv2d(8, 6, 1)
        self.grouped = nn.Conv2d(6, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(torch.relu(self.pw2(torch.relu(self.dw(self.pw(x))))))


class FeedForward(nn.Module):
    """A transformer FFN on [batch, tokens, width]: Linear, GELU, Linear."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class UpsamplingHead(nn.Module):
    """A Conv, a strided ConvTranspose that doubles the resolution (as segmentation heads do), and a 1x1 Conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.up(torch.relu(self.conv(x)))))


class ChannelMixing(nn.Module):
    """One Conv whose output a Reshape splits across channels, another that is a graph output."""

    def __init__(self):
        super().__init__()
        self.mixed, self.exposed = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixed(x).reshape(1, 2, 2, 64).sum(1), self.exposed(x)


MODELS = {
    "residual": (ResidualBlocks, (1, 3, 8, 8)),
    "depthwise": (DepthwiseSeparable, (1, 3, 8, 8)),
    "dense": (DenseBlock, (1, 3, 8, 8)),
    "conv_head": (ConvHead, (1, 3, 8, 8)),
    "grouped": (GroupedConvs, (1, 3, 8, 8)),
    "ffn": (FeedForward, (2, 5, 8)),
    "upsampling": (UpsamplingHead, (1, 3, 8, 8)),
    "mixing": (ChannelMixing, (1, 3, 8, 8)),
}


def _exported(name: str, fold_bn: bool) -> onnx.ModelProto:
    """The model after cleanup; BatchNorm kept (no constant folding at export) unless `fold_bn`."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    module = build().eval()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    model, _ = apply("cleanup", from_torch(module, torch.randn(*shape), do_constant_folding=False))
    if fold_bn:
        model, _ = apply("fold-batchnorm", model)
    return model.to_proto()


def _groups(proto: onnx.ModelProto) -> tuple[Model, list[ChannelGroup]]:
    model = load_model(proto)
    return model, ChannelGroups.compute(model)


def _module(node) -> str:
    """The module a node was exported from; a Conv with its BatchNorm `<conv>_bn` folded in counts as the Conv's."""
    return node.name.split("/")[1].removesuffix("_bn")


def _by_producers(groups: list[ChannelGroup]) -> dict[tuple[str, ...], ChannelGroup]:
    return {tuple(sorted(_module(s.node) for s in g.producers)): g for g in groups}


def _slots(slots) -> set[tuple[str, int, int, int, int]]:
    """(module, input index, axis, offset, repeat) of each slot."""
    return {(_module(s.node), s.input_index, s.axis, s.offset, s.repeat) for s in slots}


def _run(model: Model, proto: onnx.ModelProto) -> None:
    inputs = random_inputs(skeleton_proto(load_model(proto)), seed=5)
    get_backend("ort").prepare(model, BackendOptions()).run(inputs)


CASES = [(name, fold) for name in MODELS for fold in (False, True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{'folded' if f else 'bn'}" for n, f in CASES])
def exported(request) -> onnx.ModelProto:
    return _exported(*request.param)


def test_residual_adds_couple_the_convs_they_add():
    proto = _exported("residual", fold_bn=True)
    groups = _by_producers(_groups(proto)[1])
    coupled = groups[("b1", "b2", "stem")]
    assert coupled.prunable and coupled.channels == 8
    assert _slots(coupled.consumers) == {("a1", 1, 1, 0, 1), ("a2", 1, 1, 0, 1), ("head", 1, 1, 0, 1)}
    for inner, reader in (("a1", "b1"), ("a2", "b2")):
        group = groups[(inner,)]
        assert group.prunable and [_module(s.node) for s in group.consumers] == [reader]
    assert not groups[("head",)].prunable and "graph output" in groups[("head",)].reason


def test_batchnorm_parameters_follow_their_channels():
    groups = _by_producers(_groups(_exported("residual", fold_bn=False))[1])
    followers = {(s.node.op, _module(s.node), s.input_index) for s in groups[("b1", "b2", "stem")].followers}
    assert {("BatchNormalization", m, i) for m in ("stem", "b1", "b2") for i in range(1, 5)} <= followers
    assert {("Conv", "stem", 2), ("Conv", "b1", 2), ("Conv", "b2", 2)} <= followers


def test_depthwise_conv_follows_the_pointwise_conv_before_it():
    groups = _by_producers(_groups(_exported("depthwise", fold_bn=True))[1])
    group = groups[("pw1",)]
    assert group.prunable
    assert {("dw", 1, 0, 0, 1), ("dw", 2, 0, 0, 1)} <= _slots(group.followers)
    assert _slots(group.consumers) == {("pw2", 1, 1, 0, 1)}


def test_depthwise_multiplier_gives_each_channel_a_block_of_outputs():
    groups = _by_producers(_groups(_exported("grouped", fold_bn=True))[1])
    group = groups[("pw",)]
    assert group.prunable and ("dw", 1, 0, 0, 2) in _slots(group.followers)
    assert _slots(group.consumers) == {("pw2", 1, 1, 0, 2)}
    assert not groups[("pw2",)].prunable and "grouped Conv" in groups[("pw2",)].reason


def test_consumers_after_a_concat_read_each_group_at_its_offset():
    groups = _by_producers(_groups(_exported("dense", fold_bn=False))[1])
    first, second = groups[("conv0",)], groups[("conv1",)]
    assert _slots(first.consumers) == {("conv1", 1, 1, 0, 1), ("conv2", 1, 1, 0, 1)}
    assert _slots(second.consumers) == {("conv2", 1, 1, 4, 1)}
    assert ("bn", 1, 0, 4, 1) in _slots(second.followers) and ("bn", 1, 0, 0, 1) in _slots(first.followers)


def test_flatten_into_gemm_gives_each_channel_a_block_of_features():
    group = _by_producers(_groups(_exported("conv_head", fold_bn=True))[1])[("conv",)]
    assert group.prunable and _slots(group.consumers) == {("fc", 1, 1, 0, 16)}


def test_transformer_ffn_is_one_group_of_hidden_features():
    groups = _by_producers(_groups(_exported("ffn", fold_bn=True))[1])
    group = groups[("up",)]
    assert group.prunable and group.channels == 16
    assert _slots(group.producers) == {("up", 1, 1, 0, 1)}
    assert _slots(group.consumers) == {("down", 1, 0, 0, 1)}
    assert [s.node.op for s in group.followers] == ["Add"]


def test_channel_mixing_reshape_and_graph_outputs_are_not_prunable():
    groups = _by_producers(_groups(_exported("mixing", fold_bn=True))[1])
    assert not groups[("mixed",)].prunable and "Reshape" in groups[("mixed",)].reason
    assert not groups[("exposed",)].prunable and "graph output" in groups[("exposed",)].reason


def test_pass_context_caches_channel_groups():
    model = load_model(_exported("ffn", fold_bn=True))
    ctx = PassContext()
    assert ctx.analysis(ChannelGroups, model) is ctx.analysis(ChannelGroups, model)


def test_removing_half_the_channels_gives_a_valid_smaller_model(exported):
    _, groups = _groups(exported)
    for index, group in enumerate(groups):
        if not group.prunable:
            continue
        model = load_model(exported)
        fresh = ChannelGroups.compute(model)[index]
        removed = group.channels - group.channels // 2
        sizes = [s.tensor.shape[s.axis] for s in fresh.slots]
        keep = np.sort(np.random.default_rng(index).choice(group.channels, group.channels // 2, replace=False))
        remove_channels(model, [(fresh, keep)])
        for slot, size in zip(fresh.slots, sizes):
            assert slot.tensor.shape[slot.axis] == size - removed * slot.repeat
        onnx.checker.check_model(model.to_proto(), full_check=True)
        _run(model, exported)


def test_keeping_every_channel_leaves_outputs_unchanged(exported):
    _, groups = _groups(exported)
    for index, group in enumerate(groups):
        if group.prunable:
            model = load_model(exported)
            remove_channels(model, [(ChannelGroups.compute(model)[index], np.arange(group.channels))])
            assert max_rel_error(exported, model) < RTOL


def test_removing_channels_no_consumer_reads_leaves_outputs_unchanged(exported):
    """Consumers ignore the removed channels (zero weights there): outputs stay put only if every slice agrees."""
    _, groups = _groups(exported)
    for index, group in enumerate(groups):
        if not group.prunable or group.channels < 2:
            continue
        removed = np.arange(0, group.channels, 2)
        model = load_model(exported)
        for slot in ChannelGroups.compute(model)[index].consumers:
            values = slot.tensor.values.copy()
            values.swapaxes(0, slot.axis)[slot.positions(removed)] = 0
            slot.node.inputs[slot.input_index] = make_constant(model.graph, slot.tensor.name, values)
        reference = model.to_proto()
        kept = np.setdiff1d(np.arange(group.channels), removed)
        remove_channels(model, [(ChannelGroups.compute(model)[index], kept)])
        assert max_rel_error(reference, model) < RTOL


def test_removing_channels_with_zero_weights_leaves_outputs_unchanged():
    """Conv channels with zero weight and bias are zero after ReLU: removing them changes nothing."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    with torch.no_grad():
        module[0].weight[[1, 4]] = 0
        module[0].bias[[1, 4]] = 0
    proto = apply("cleanup", from_torch(module, torch.randn(1, 3, 8, 8)))[0].to_proto()
    model, (group, _) = _groups(proto)
    remove_channels(model, [(group, np.array([0, 2, 3, 5]))])
    assert model.graph.nodes[2].inputs[1].shape == (4, 4, 3, 3)
    assert max_rel_error(proto, model) < RTOL
