"""Channel dependency groups: output channels of layers that can only be pruned together, and who reads them.

The walk goes through the main graph in topological order and follows every producer's channels
(Conv, ConvTranspose, Gemm, MatMul outputs) through ops that keep channels apart, until layers read them
as input channels. Channels that meet in an element-wise op (a residual Add) couple their groups;
a Concat places several groups side by side; a Flatten into a Gemm gives each channel a block of features.
Attention heads are groups too: a Reshape that splits the hidden features into (heads, head size) makes its
group count heads, the per-head products (Q @ K^T, P @ V) couple the Q, K and V groups, and the Reshape that
merges the heads back gives each head a block of features; onnxruntime's fused Attention is a head group itself.
Whatever the walk does not understand makes the groups involved not prunable, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model, infer_shapes, to_networkx
from onnxforge.ir.layers import CONVOLUTIONS, LINEAR_OPS, Layer, as_layer
from onnxforge.ir.ops import CONTRIB_DOMAIN, is_onnx_op
from onnxforge.ir.shape_values import dims_of, refine_reshapes, reshaped, shape_value
from onnxforge.ir.shapes import merged_symbolic_dims
from onnxforge.pipeline.base import Analysis

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
# onnxruntime's element-wise contrib ops: an activation of the input plus an optional bias along the channels.
CONTRIB_ELEMENTWISE = frozenset({"BiasGelu", "FastGelu", "Gelu", "QuickGelu"})
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


@dataclass(frozen=True, eq=False)
class CountSlot:
    """A number in the graph that says how many channels a group has, times `unit`: entry `index` of a
    Reshape's constant target (input 1), or the node's `attribute` (an attention node's num_heads)."""

    node: gs.Node
    index: int
    unit: int
    attribute: str = ""
    target: tuple[int, ...] | None = None  # a computed target's replacement, see _constant_target

    @property
    def key(self) -> tuple[int, int, str]:
        return id(self.node), self.index, self.attribute


@dataclass
class ChannelGroup:
    """Output channels of one or more producers that can only be removed together, and everyone that reads them.

    `producers` hold the output channels (weights sliced on their output axis), `consumers` read them as
    input channels, `followers` are per-channel parameters on the way (biases, BatchNormalization,
    depthwise Conv weights, per-channel constants of element-wise ops). All are sliced alike; `counts` are
    rewritten with the new channel count. A group of attention heads (`unit` "heads") has one channel per head.
    """

    channels: int
    producers: list[ChannelSlot] = field(default_factory=list)
    consumers: list[ChannelSlot] = field(default_factory=list)
    followers: list[ChannelSlot] = field(default_factory=list)
    counts: list[CountSlot] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""
    unit: str = "channels"

    @property
    def slots(self) -> list[ChannelSlot]:
        return [*self.producers, *self.followers, *self.consumers]


class ChannelGroups(Analysis):
    """The channel groups of the main graph, in the order of their first producer (fills in shapes)."""

    @classmethod
    def compute(cls, model: Model) -> list[ChannelGroup]:
        infer_shapes(model)
        if refine_reshapes(model.graph):  # head sizes computed from Shape (dynamic axes): spread what is known
            infer_shapes(model)
        with merged_symbolic_dims(model):  # a batch the exporter's shape arithmetic renamed is the input's again
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
        for role in ("producers", "consumers", "followers", "counts"):
            slots = getattr(kept, role)
            keys = {s.key for s in slots}
            slots += [s for s in getattr(merged, role) if s.key not in keys]
        if merged.unit != kept.unit:
            self._fail_group(first, f"{merged.unit} meet {kept.unit}")
        if not merged.prunable:
            self._fail_group(first, merged.reason)

    def _new_group(self, channels: int, unit: str = "channels") -> int:
        self.parent.append(len(self.groups))
        self.groups.append(ChannelGroup(channels, unit=unit))
        return len(self.groups) - 1

    def _into_heads(self, layout: _Layout, size: int, where: str) -> int | None:
        """Make the one group of `layout` count heads of `size` channels; its index, or None if it cannot."""
        (segment,) = layout.segments
        root = self._find(segment.group)
        group = self.groups[root]
        if group.unit != "channels" or group.channels % size or any(s.offset % size for s in group.slots):
            self._fail_group(root, f"{where} splits channels that are not whole heads")
            return None
        for name, other in list(self.layouts.items()):
            if any(s.group is not None and self._find(s.group) == root for s in other.segments):
                if len(other.segments) != 1:
                    self._fail_group(root, f"{where} splits heads out of channels that '{name}' concatenates")
                    return None
                self.layouts[name] = _Layout(
                    other.axis, (_Segment(other.segments[0].group, 0, group.channels // size),), other.repeat * size
                )
        for role in ("producers", "consumers", "followers"):
            setattr(group, role, [
                dataclasses.replace(s, offset=s.offset // size, repeat=s.repeat * size) for s in getattr(group, role)
            ])  # fmt: skip
        group.counts = [dataclasses.replace(c, unit=c.unit * size) for c in group.counts]
        group.channels //= size
        group.unit = "heads"
        return root

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
        if _is_packed_attention(node):
            return self._attention_heads(node)
        layer = _producer(node)
        if layer is None:
            return
        channels = layer.weight.shape[layer.out_axis]
        layout = _Layout(layer.channel_axis, (_Segment(self._new_group(channels), 0, channels),))
        self._add("producers", layout, node, 1, layer.out_axis)
        if len(node.inputs) > 2 and node.inputs[2].name:
            if node.op == "Gemm":
                self._broadcast_input(node, 2, layout)
            elif isinstance(node.inputs[2], gs.Constant):
                self._add("followers", layout, node, 2, 0)
            else:
                self._fail(layout, f"{node.op} '{node.name}' has a non-constant bias")
        self.layouts[node.outputs[0].name] = layout

    def _attention_heads(self, node: gs.Node) -> None:
        """onnxruntime's Attention: its heads are a group, held by the Q, K and V parts of its packed weight."""
        heads = node.attrs["num_heads"]
        size = node.inputs[1].shape[1] // (3 * heads)
        group = self._new_group(heads, "heads")
        self.groups[group].counts.append(CountSlot(node, 0, 1, "num_heads"))
        for part in range(3):
            slot = _Layout(-1, (_Segment(group, part * heads, heads),), size)
            self._add("producers", slot, node, 1, 1)
            if len(node.inputs) > 2 and node.inputs[2].name:
                self._add("followers", slot, node, 2, 0)
        self._pass(node, _Layout(-1, (_Segment(group, 0, heads),), size))

    # -- readers --------------------------------------------------------------------------------------

    def _read(self, node: gs.Node, tracked: dict[int, _Layout]) -> None:
        """Follow the channels of the tracked inputs through `node`, or record it as their consumer."""
        if _is_packed_attention(node) and list(tracked) == [0] and tracked[0].axis == -1:
            return self._add("consumers", tracked[0], node, 1, 0)
        if node.domain == CONTRIB_DOMAIN and node.op in CONTRIB_ELEMENTWISE:
            return self._combine(node, tracked)
        if not is_onnx_op(node):
            return self._fail_all(tracked, f"custom op {node.op} '{node.name}' reads the channels")
        if node.op in LINEAR_OPS:
            return self._consume(node, tracked)
        if node.op in ELEMENTWISE_NARY or node.op == "PRelu":
            return self._combine(node, tracked)
        if node.op == "Where" and 0 not in tracked:  # chooses values element by element (zeroes masked rows)
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
        if node.op == "Flatten":
            return self._flatten(node, layout, rank)
        if node.op == "Reshape":
            return self._reshape(node, layout, rank)
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
        if node.op == "MatMul" and len(tracked) == 2:
            return self._per_head_product(node, tracked)
        weight = node.inputs[1]
        if list(tracked) != [0] or not isinstance(weight, gs.Constant):
            return self._fail_all(tracked, f"{node.op} '{node.name}' reads the channels with a non-constant weight")
        layout, rank, layer = tracked[0], len(weight.shape), as_layer(node)
        if node.op in CONVOLUTIONS:
            if layout.axis != 1 - rank:
                return self._fail(layout, f"{node.op} '{node.name}' reads the channels on a spatial axis")
            group = node.attrs.get("group", 1)
            if group == 1:
                return self._add("consumers", layout, node, 1, layer.in_axis)
            if node.op == "Conv" and group == layout.width and weight.shape[1] == 1 and layout.repeat == 1:
                return self._depthwise(node, layout, weight.shape[0] // group)
            return self._fail(layout, f"grouped {node.op} '{node.name}' (group={group}) reads the channels")
        if layout.axis != -1:
            return self._fail(layout, f"{node.op} '{node.name}' reads the channels on a non-feature axis")
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return self._fail(layout, f"Gemm '{node.name}' transposes the channels (transA)")
        if layer is None:
            return self._fail(layout, f"MatMul '{node.name}' reads the channels with a 1-D weight")
        self._add("consumers", layout, node, 1, layer.in_axis)

    def _per_head_product(self, node: gs.Node, tracked: dict[int, _Layout]) -> None:
        """A MatMul of two walked tensors (Q @ K^T, P @ V) multiplies head by head when both carry their heads
        on the same batch axis: it couples their groups, and its product keeps the heads there."""
        ranks = {_rank(t) for t in node.inputs}
        if len(ranks) != 1 or None in ranks or any(layout.axis > -3 for layout in tracked.values()):
            return self._fail_all(tracked, f"MatMul '{node.name}' multiplies the channels with each other")
        self._combine(node, tracked)

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
        if tensor.shape is None:
            return self._fail(layout, f"shape of '{tensor.name}' (input of {node.op} '{node.name}') is unknown")
        axis = len(tensor.shape) + layout.axis
        if axis < 0:
            return
        if not isinstance(tensor.shape[axis], int):  # only the channel axis matters: others may be symbolic
            return self._fail(layout, f"shape of '{tensor.name}' (input of {node.op} '{node.name}') is unknown")
        if tensor.shape[axis] == 1:
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
        if node.attrs.get("axis", 1) % rank != rank + layout.axis:
            return self._fail(layout, f"Flatten '{node.name}' mixes the channels with other axes")
        block = math.prod(shape[rank + layout.axis + 1 :])
        self._pass(node, _Layout(-1, layout.segments, layout.repeat * block))

    def _reshape(self, node: gs.Node, layout: _Layout, rank: int | None) -> None:
        """A Reshape that merges the channel axis with the axes after it (each channel gets a block of
        features), or splits it into (heads, head size); its target's channel entry must be explicit (it is
        rewritten) or -1. The target may be computed from shapes (dynamic axes): the axes before the channels
        may then be symbolic, those from the channels on must be constants."""
        target, before = node.inputs[1], dims_of(node.inputs[0])
        entries = shape_value(target)
        after = None if entries is None or before is None else reshaped(before, entries, node.attrs.get("allowzero", 0))
        if rank is None or after is None or len(before) != rank:
            return self._fail(layout, f"Reshape '{node.name}' has a target that is not read or unknown shapes")
        axis = rank + layout.axis
        if not all(isinstance(d, int) for d in [*before[axis:], *after[axis:], *entries[axis:]]):
            return self._fail(layout, f"Reshape '{node.name}' has symbolic sizes from the channel axis on")
        if not _same_leading(before, after, axis) or len(entries) != len(after) or entries[axis] == 0:
            return self._fail(layout, f"Reshape '{node.name}' mixes the channels with other axes")
        if len(after) == rank + 1 and list(after[axis + 2 :]) == list(before[axis + 1 :]):
            return self._split_heads(node, layout, axis, after[axis + 1], entries)
        merged = rank - len(after) + 1
        if merged < 1 or list(after[axis + 1 :]) != list(before[axis + merged :]):
            return self._fail(layout, f"Reshape '{node.name}' mixes the channels with other axes")
        block = math.prod(before[axis + 1 : axis + merged])
        merged_layout = _Layout(axis - len(after), layout.segments, layout.repeat * block)
        if entries[axis] != -1:
            if len(layout.segments) != 1 or layout.segments[0].group is None:
                return self._fail(layout, f"Reshape '{node.name}' hard-codes the count of channels of several groups")
            group = self.groups[self._find(layout.segments[0].group)]
            constant = _constant_target(target, axis, entries)
            group.counts.append(CountSlot(node, axis, merged_layout.repeat, target=constant))
        self._pass(node, merged_layout)

    def _split_heads(self, node: gs.Node, layout: _Layout, axis: int, size: int, entries: list[int]) -> None:
        """The channel axis split into (heads, `size`): the group now counts heads of `size` channels."""
        if layout.repeat != 1 or len(layout.segments) != 1 or layout.segments[0].group is None:
            return self._fail(layout, f"Reshape '{node.name}' splits channels of several groups")
        if entries[axis + 1] != size:
            return self._fail(layout, f"Reshape '{node.name}' does not state the head size")
        root = self._into_heads(layout, size, f"Reshape '{node.name}'")
        if root is None:
            return
        heads = self.groups[root].channels
        if entries[axis] != -1:
            constant = _constant_target(node.inputs[1], axis, entries)
            self.groups[root].counts.append(CountSlot(node, axis, 1, target=constant))
        self._pass(node, _Layout(axis - len(entries), (_Segment(layout.segments[0].group, 0, heads),)))


def _producer(node: gs.Node) -> Layer | None:
    """`node` as a layer whose output channels start a group: an ungrouped Conv or ConvTranspose, a Gemm without
    transA or a MatMul of a 2-D weight, reading a computed input."""
    layer = as_layer(node)
    if layer is None or layer.op not in LINEAR_OPS or isinstance(layer.activation, gs.Constant):
        return None
    if layer.op in CONVOLUTIONS:
        return layer if node.attrs.get("group", 1) == 1 else None
    if layer.op == "Gemm":
        return None if node.attrs.get("transA", 0) else layer
    return layer if len(layer.weight.shape) == 2 else None


def _is_packed_attention(node: gs.Node) -> bool:
    """onnxruntime's Attention with one constant packed Q, K, V weight of equal parts and no past state."""
    if node.op != "Attention" or node.domain != CONTRIB_DOMAIN or "qkv_hidden_sizes" in node.attrs:
        return False
    weight, heads = node.inputs[1] if len(node.inputs) > 1 else None, node.attrs.get("num_heads")
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 2 or not heads or weight.shape[1] % (3 * heads):
        return False
    bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)
    no_past = all(not t.name for t in node.inputs[4:5]) and all(not t.outputs for t in node.outputs[1:])
    return bias_ok and no_past


def _same_leading(before: list, after: list, axis: int) -> bool:
    """Whether a Reshape keeps the axes before `axis`: equal dims, or one pair of symbols that must be equal
    since the rest are and the Reshape keeps the element count (the tails are constants of equal product)."""
    if len(before) < axis or len(after) < axis:
        return False
    differ = [i for i in range(axis) if before[i] != after[i]]
    if not differ:
        return True
    tails_equal = math.prod(before[axis:]) == math.prod(after[axis:])
    return len(differ) == 1 and tails_equal and all(isinstance(d[differ[0]], str) for d in (before, after))


def _constant_target(target: gs.Tensor, axis: int, entries: list) -> tuple[int, ...] | None:
    """For a computed Reshape target, the constant one to write when its channel entry changes: 0 (copy,
    with allowzero 0) for the axes before the channels, which the Reshape keeps, and the entries from there."""
    if isinstance(target, gs.Constant):
        return None
    return (0,) * axis + tuple(int(e) for e in entries[axis:])


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _read_by_subgraphs(model: Model) -> set[str]:
    """Names of the tensors that nodes of nested subgraphs read (possibly from the main graph's scope)."""
    graphs = list(model.graphs())[1:]
    return {t.name for g in graphs for node in g.nodes for t in node.inputs}
