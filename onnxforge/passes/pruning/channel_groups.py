"""Channel dependency groups: output channels of layers that can only be pruned together, and who reads them.

The walk goes through the main graph in topological order and follows every producer's channels
(Conv, ConvTranspose, Gemm, MatMul outputs) through ops that keep channels apart, until layers read them
as input channels. Channels that meet in an element-wise op (a residual Add) couple their groups;
a Concat places several groups side by side; a Flatten into a Gemm gives each channel a block of features.
Whatever the walk does not understand makes the groups involved not prunable, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model, infer_shapes, to_networkx
from onnxforge.ir.ops import is_onnx_op
from onnxforge.passes.base import Analysis

# Ops that compute each element from the same element of their one data input.
ELEMENTWISE_UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish",
        "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip", "Erf", "Abs", "Neg", "Exp", "Log",
        "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Cast", "Identity", "Dropout",
    }
)  # fmt: skip
# Ops that combine inputs element by element after numpy broadcasting.
ELEMENTWISE_NARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean"})
# NCHW ops that work on the spatial axes of each channel separately.
SPATIAL = frozenset(
    {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Pad", "Resize"}
)
# Ops that normalize over one axis: they keep channels apart unless that axis is the channel axis.
AXIS_NORMALIZING = frozenset({"Softmax", "LogSoftmax"})
# Per-channel parameters (inputs 1..) of normalizations over NCHW channel axis 1.
CHANNEL_NORMALIZATIONS = {"BatchNormalization": range(1, 5), "InstanceNormalization": range(1, 3)}


@dataclass(frozen=True, eq=False)
class ChannelSlot:
    """One constant input of one node that holds a group's channels along `axis`.

    Channel c of the group sits at indices (offset + c) * repeat + r, for r < repeat, of that axis:
    `offset` places the group inside a Concat, `repeat` is the block of features each channel owns after
    a Flatten into a Gemm (or the channel multiplier of a depthwise Conv).
    """

    node: gs.Node
    input_index: int
    axis: int
    offset: int = 0
    repeat: int = 1

    @property
    def tensor(self) -> gs.Tensor:
        return self.node.inputs[self.input_index]

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """What makes two slots the same: node identity, input, axis, offset and repeat."""
        return id(self.node), self.input_index, self.axis, self.offset, self.repeat

    def positions(self, channels: np.ndarray) -> np.ndarray:
        """Indices along `axis` that the given channels of the group occupy, channel by channel."""
        starts = (self.offset + np.asarray(channels, dtype=np.int64)) * self.repeat
        return (starts[:, None] + np.arange(self.repeat)).ravel()


@dataclass
class ChannelGroup:
    """Output channels of one or more producers that can only be removed together, and everyone that reads them.

    `producers` hold the output channels (weights sliced on their output axis), `consumers` read them as
    input channels, `followers` are per-channel parameters on the way (biases, BatchNormalization,
    depthwise Conv weights, per-channel constants of element-wise ops). All are sliced alike.
    """

    channels: int
    producers: list[ChannelSlot] = field(default_factory=list)
    consumers: list[ChannelSlot] = field(default_factory=list)
    followers: list[ChannelSlot] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""

    @property
    def slots(self) -> list[ChannelSlot]:
        return [*self.producers, *self.followers, *self.consumers]


class ChannelGroups(Analysis):
    """The channel groups of the main graph, in the order of their first producer (fills in shapes)."""

    @classmethod
    def compute(cls, model: Model) -> list[ChannelGroup]:
        infer_shapes(model)
        return _ChannelWalk(model.graph, _read_by_subgraphs(model)).run()


@dataclass(frozen=True)
class _Segment:
    """`length` channels of group `group` (None: channels of no group) starting at channel `offset`."""

    group: int | None
    offset: int
    length: int


@dataclass(frozen=True)
class _Layout:
    """How a walked tensor's channel axis is made of groups; `axis` counts from the last axis (negative)."""

    axis: int
    segments: tuple[_Segment, ...]
    repeat: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def width(self) -> int:
        """The size of the channel axis."""
        return self.channels * self.repeat


class _ChannelWalk:
    """One forward walk over a graph that builds the groups, merging coupled ones with union-find."""

    def __init__(self, graph: gs.Graph, read_by_subgraphs: set[str]):
        self.graph = graph
        self.read_by_subgraphs = read_by_subgraphs
        self.layouts: dict[str, _Layout] = {}
        self.groups: list[ChannelGroup] = []
        self.parent: list[int] = []

    def run(self) -> list[ChannelGroup]:
        view = to_networkx(self.graph)
        # Graph order among independent nodes, so that groups come out in the order of their producers.
        ranked = nx.lexicographical_topological_sort(view, key=lambda v: v if isinstance(v, int) else -1)
        order = [v for v in ranked if isinstance(v, int)]
        for index in order:
            node = self.graph.nodes[index]
            tracked = {i: self.layouts[t.name] for i, t in enumerate(node.inputs) if t.name in self.layouts}
            if tracked:
                self._read(node, tracked)
            self._produce(node)
        for name, layout in self.layouts.items():
            if name in self.read_by_subgraphs:
                self._fail(layout, f"'{name}' is read inside a subgraph")
        for tensor in self.graph.outputs:
            if tensor.name in self.layouts:
                self._fail(self.layouts[tensor.name], f"reaches graph output '{tensor.name}'")
        return [group for i, group in enumerate(self.groups) if self._find(i) == i]

    # -- groups ---------------------------------------------------------------------------------------

    def _find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def _union(self, a: int, b: int) -> None:
        a, b = self._find(a), self._find(b)
        if a == b:
            return
        first, second = (a, b) if a < b else (b, a)
        kept, merged = self.groups[first], self.groups[second]
        self.parent[second] = first
        for role in ("producers", "consumers", "followers"):
            slots = getattr(kept, role)
            keys = {s.key for s in slots}
            slots += [s for s in getattr(merged, role) if s.key not in keys]
        if not merged.prunable:
            self._fail_group(first, merged.reason)

    def _fail_group(self, group: int, reason: str) -> None:
        target = self.groups[self._find(group)]
        if target.prunable:
            target.prunable, target.reason = False, reason

    def _fail(self, layout: _Layout, reason: str) -> None:
        for segment in layout.segments:
            if segment.group is not None:
                self._fail_group(segment.group, reason)

    def _add(self, role: str, layout: _Layout, node: gs.Node, input_index: int, axis: int, repeat: int = 1) -> None:
        """Record `node.inputs[input_index]` as a producer, consumer or follower slot of each group in `layout`."""
        for segment in layout.segments:
            if segment.group is not None:
                slot = ChannelSlot(node, input_index, axis, segment.offset, layout.repeat * repeat)
                slots = getattr(self.groups[self._find(segment.group)], role)
                if all(s.key != slot.key for s in slots):
                    slots.append(slot)

    # -- producers ------------------------------------------------------------------------------------

    def _produce(self, node: gs.Node) -> None:
        """Start a group for the output channels of a Conv, ConvTranspose, Gemm or MatMul with a constant weight."""
        found = _producer_axes(node)
        if found is None:
            return
        weight_axis, output_axis = found
        channels = node.inputs[1].shape[weight_axis]
        self.parent.append(len(self.groups))
        self.groups.append(ChannelGroup(channels))
        layout = _Layout(output_axis, (_Segment(len(self.groups) - 1, 0, channels),))
        self._add("producers", layout, node, 1, weight_axis)
        if len(node.inputs) > 2 and node.inputs[2].name:
            if node.op == "Gemm":
                self._broadcast_input(node, 2, layout)
            elif isinstance(node.inputs[2], gs.Constant):
                self._add("followers", layout, node, 2, 0)
            else:
                self._fail(layout, f"{node.op} '{node.name}' has a non-constant bias")
        self.layouts[node.outputs[0].name] = layout

    # -- readers --------------------------------------------------------------------------------------

    def _read(self, node: gs.Node, tracked: dict[int, _Layout]) -> None:
        """Follow the channels of the tracked inputs through `node`, or record it as their consumer."""
        if not is_onnx_op(node):
            return self._fail_all(tracked, f"custom op {node.op} '{node.name}' reads the channels")
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return self._consume(node, tracked)
        if node.op in ELEMENTWISE_NARY or node.op == "PRelu":
            return self._combine(node, tracked)
        if node.op == "Concat":
            return self._concat(node, tracked)
        if len(tracked) != 1 or 0 not in tracked:
            return self._fail_all(tracked, f"{node.op} '{node.name}' reads the channels in a way not understood")
        layout = tracked[0]
        rank = _rank(node.inputs[0])
        if node.op in ELEMENTWISE_UNARY:
            return self._pass(node, layout)
        if node.op in AXIS_NORMALIZING and rank is not None:
            if node.attrs.get("axis", -1) % rank == rank + layout.axis:
                return self._fail(layout, f"{node.op} '{node.name}' normalizes over the channels")
            return self._pass(node, layout)
        if node.op in SPATIAL or node.op in CHANNEL_NORMALIZATIONS:
            return self._per_channel(node, layout, rank)
        if node.op in ("Flatten", "Reshape"):
            return self._flatten(node, layout, rank)
        if node.op == "Transpose" and rank is not None:
            perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
            return self._pass(node, _Layout(perm.index(rank + layout.axis) - rank, layout.segments, layout.repeat))
        self._fail(layout, f"{node.op} '{node.name}' reads the channels and is not understood")

    def _fail_all(self, tracked: dict[int, _Layout], reason: str) -> None:
        for layout in tracked.values():
            self._fail(layout, reason)

    def _pass(self, node: gs.Node, layout: _Layout) -> None:
        """The first output of `node` carries the channels as `layout`; its other outputs must be unused."""
        for extra in node.outputs[1:]:
            if extra.outputs or extra in self.graph.outputs:
                return self._fail(layout, f"output '{extra.name}' of {node.op} '{node.name}' is not followed")
        self.layouts[node.outputs[0].name] = layout

    def _consume(self, node: gs.Node, tracked: dict[int, _Layout]) -> None:
        weight = node.inputs[1]
        if list(tracked) != [0] or not isinstance(weight, gs.Constant):
            return self._fail_all(tracked, f"{node.op} '{node.name}' reads the channels with a non-constant weight")
        layout, rank = tracked[0], len(weight.shape)
        if node.op in ("Conv", "ConvTranspose"):
            if layout.axis != 1 - rank:
                return self._fail(layout, f"{node.op} '{node.name}' reads the channels on a spatial axis")
            group = node.attrs.get("group", 1)
            if group == 1:
                return self._add("consumers", layout, node, 1, 1 if node.op == "Conv" else 0)
            if node.op == "Conv" and group == layout.width and weight.shape[1] == 1 and layout.repeat == 1:
                return self._depthwise(node, layout, weight.shape[0] // group)
            return self._fail(layout, f"grouped {node.op} '{node.name}' (group={group}) reads the channels")
        if layout.axis != -1:
            return self._fail(layout, f"{node.op} '{node.name}' reads the channels on a non-feature axis")
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                return self._fail(layout, f"Gemm '{node.name}' transposes the channels (transA)")
            return self._add("consumers", layout, node, 1, 1 if node.attrs.get("transB", 0) else 0)
        if rank < 2:
            return self._fail(layout, f"MatMul '{node.name}' reads the channels with a 1-D weight")
        self._add("consumers", layout, node, 1, rank - 2)

    def _depthwise(self, node: gs.Node, layout: _Layout, multiplier: int) -> None:
        """A depthwise Conv keeps channels apart: its weight and bias follow, its output continues the walk."""
        self._add("followers", layout, node, 1, 0, multiplier)
        if len(node.inputs) > 2 and node.inputs[2].name:
            if not isinstance(node.inputs[2], gs.Constant):
                return self._fail(layout, f"depthwise Conv '{node.name}' has a non-constant bias")
            self._add("followers", layout, node, 2, 0, multiplier)
        self._pass(node, _Layout(layout.axis, layout.segments, multiplier))

    def _combine(self, node: gs.Node, tracked: dict[int, _Layout]) -> None:
        """Element-wise ops on several walked tensors couple their groups, segment by segment."""
        layouts = list(tracked.values())
        first = layouts[0]
        for other in layouts[1:]:
            if (other.axis, other.repeat) != (first.axis, first.repeat) or [
                (s.offset, s.length) for s in other.segments
            ] != [(s.offset, s.length) for s in first.segments]:
                return self._fail_all(tracked, f"{node.op} '{node.name}' mixes channels laid out differently")
            for a, b in zip(first.segments, other.segments):
                if a.group is not None and b.group is not None:
                    self._union(a.group, b.group)
                elif a.group is not None or b.group is not None:
                    return self._fail_all(tracked, f"{node.op} '{node.name}' adds channels that cannot be pruned")
        for index in range(len(node.inputs)):
            if index not in tracked:
                self._broadcast_input(node, index, first)
        self._pass(node, first)

    def _broadcast_input(self, node: gs.Node, index: int, layout: _Layout) -> None:
        """An input broadcast against walked channels: fine across them, a follower per channel, else a failure."""
        tensor = node.inputs[index]
        if not tensor.name:
            return
        if tensor.shape is None or any(not isinstance(d, int) for d in tensor.shape):
            return self._fail(layout, f"shape of '{tensor.name}' (input of {node.op} '{node.name}') is unknown")
        axis = len(tensor.shape) + layout.axis
        if axis < 0 or tensor.shape[axis] == 1:
            return
        if isinstance(tensor, gs.Constant) and tensor.shape[axis] == layout.width:
            return self._add("followers", layout, node, index, axis)
        self._fail(layout, f"{node.op} '{node.name}' combines the channels with '{tensor.name}', which is not pruned")

    def _concat(self, node: gs.Node, tracked: dict[int, _Layout]) -> None:
        rank = _rank(node.outputs[0])
        axes = {layout.axis for layout in tracked.values()}
        if rank is None or len(axes) != 1:
            return self._fail_all(tracked, f"Concat '{node.name}' has unknown rank or mixed channel axes")
        (axis,) = axes
        if node.attrs["axis"] % rank != rank + axis:
            return self._combine(node, tracked)
        segments, offset = [], 0
        for index, tensor in enumerate(node.inputs):
            layout = tracked.get(index)
            if layout is not None and layout.repeat == 1:
                segments += [_Segment(s.group, s.offset + offset, s.length) for s in layout.segments]
                offset += layout.channels
            elif layout is None and tensor.shape is not None and isinstance(tensor.shape[axis], int):
                segments.append(_Segment(None, offset, tensor.shape[axis]))
                offset += tensor.shape[axis]
            else:
                return self._fail_all(tracked, f"Concat '{node.name}' input '{tensor.name}' has unknown channels")
        self._pass(node, _Layout(axis, tuple(segments)))

    def _per_channel(self, node: gs.Node, layout: _Layout, rank: int | None) -> None:
        """NCHW ops that treat each channel on its own: pooling, Pad, Resize, BatchNorm and InstanceNorm."""
        output_shape = node.outputs[0].shape
        if rank is None or layout.axis != 1 - rank or output_shape is None or len(output_shape) != rank:
            return self._fail(layout, f"{node.op} '{node.name}' does not read the channels on NCHW axis 1")
        if output_shape[1] != node.inputs[0].shape[1]:
            return self._fail(layout, f"{node.op} '{node.name}' changes the channel count")
        if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
            return self._fail(layout, f"Resize '{node.name}' hard-codes the channel count in its sizes")
        for index in CHANNEL_NORMALIZATIONS.get(node.op, ()):
            if not isinstance(node.inputs[index], gs.Constant):
                return self._fail(layout, f"{node.op} '{node.name}' has non-constant parameters")
            self._add("followers", layout, node, index, 0)
        self._pass(node, layout)

    def _flatten(self, node: gs.Node, layout: _Layout, rank: int | None) -> None:
        """Flattening the channel axis with everything after it gives each channel a contiguous block of features."""
        shape = node.inputs[0].shape
        if rank is None or any(not isinstance(d, int) for d in shape[rank + layout.axis :]):
            return self._fail(layout, f"{node.op} '{node.name}' flattens dimensions of unknown size")
        axis = rank + layout.axis
        if node.op == "Flatten":
            if node.attrs.get("axis", 1) % rank != axis:
                return self._fail(layout, f"Flatten '{node.name}' mixes the channels with other axes")
        elif not _merges_channels_with_rest(node, axis):
            return self._fail(layout, f"Reshape '{node.name}' mixes the channels or hard-codes their count")
        block = math.prod(shape[axis + 1 :])
        self._pass(node, _Layout(-1, layout.segments, layout.repeat * block))


def _producer_axes(node: gs.Node) -> tuple[int, int] | None:
    """(weight axis of the output channels, output axis of the channels) of a layer with a constant weight."""
    if not is_onnx_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or isinstance(node.inputs[0], gs.Constant):
        return None
    rank = len(weight.shape)
    if node.op in ("Conv", "ConvTranspose") and rank >= 3 and node.attrs.get("group", 1) == 1:
        return (0 if node.op == "Conv" else 1), 1 - rank
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return (0 if node.attrs.get("transB", 0) else 1), -1
    if node.op == "MatMul" and rank == 2:
        return 1, -1
    return None


def _merges_channels_with_rest(node: gs.Node, axis: int) -> bool:
    """Whether a Reshape keeps the axes before `axis` and merges `axis` with all after it (target size -1)."""
    target = node.inputs[1]
    if not isinstance(target, gs.Constant) or target.values.ndim != 1 or len(target.values) != axis + 1:
        return False
    before, after = node.inputs[0].shape, node.outputs[0].shape
    return target.values[axis] == -1 and after is not None and list(after[:axis]) == list(before[:axis])


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _read_by_subgraphs(model: Model) -> set[str]:
    """Names of the tensors that nodes of nested subgraphs read (possibly from the main graph's scope)."""
    graphs = list(model.graphs())[1:]
    return {t.name for g in graphs for node in g.nodes for t in node.inputs}
