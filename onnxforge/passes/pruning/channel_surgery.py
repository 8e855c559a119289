"""Removing a channel group's channels: slice every weight that holds them, so the model stays valid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model, infer_shapes
from onnxforge.ir.edit import make_constant
from onnxforge.passes.pruning.channel_groups import ChannelGroup, ChannelSlot, CountSlot


def remove_channels(model: Model, choices: Sequence[tuple[ChannelGroup, np.ndarray]]) -> None:
    """Keep only the channels `keep` (sorted indices) of each prunable group of `model`'s main graph, in place.

    All groups are cut in one go: groups side by side in one Concat read their consumer's weight at offsets
    of the unpruned model. Producers, followers and consumers get new sliced constants (existing arrays
    are never written to); depthwise Convs get their group count lowered, Reshape targets and attention
    nodes their channel or head count; tensor shapes are inferred again.
    """
    # One input may hold several groups (a Concat), one group twice (a tensor concatenated with itself), or
    # the output channels of one group and the input channels of another (on two axes).
    dropped: dict[tuple[int, int], tuple[ChannelSlot, dict[int, list[np.ndarray]]]] = {}
    depthwise: list[tuple[gs.Node, int]] = []
    for group, removed in [(group, _removed_channels(group, keep)) for group, keep in choices]:
        for count in group.counts:
            _set_count(model, count, (group.channels - removed.size) * count.unit)
        for slot in group.slots:
            entry = dropped.setdefault((id(slot.node), slot.input_index), (slot, {}))
            entry[1].setdefault(slot.axis, []).append(slot.positions(removed))
        # A Conv whose weight follows the channels (on its output axis) is depthwise: one group per channel.
        depthwise += [(s.node, removed.size) for s in group.followers if s.node.op == "Conv" and s.input_index == 1]
    for slot, by_axis in dropped.values():
        values = slot.tensor.values
        for axis, positions in by_axis.items():
            values = values.take(np.delete(np.arange(values.shape[axis]), np.concatenate(positions)), axis)
        slot.node.inputs[slot.input_index] = make_constant(model.graph, slot.tensor.name, values)
    for node, count in depthwise:
        node.attrs["group"] -= count
    _refresh_shapes(model)


def _set_count(model: Model, count: CountSlot, value: int) -> None:
    if count.attribute:
        count.node.attrs[count.attribute] = value
        return
    target = count.node.inputs[1]
    if count.target is not None:  # a target computed from shapes becomes a constant one
        entries = np.array(count.target, dtype=np.int64)
        count.node.attrs["allowzero"] = 0
    else:
        entries = np.array(target.values, copy=True)
    entries[count.index] = value
    count.node.inputs[1] = make_constant(model.graph, target.name, entries)


def _removed_channels(group: ChannelGroup, keep: np.ndarray) -> np.ndarray:
    keep = np.asarray(keep, dtype=np.int64)
    if not group.prunable:
        raise ValueError(f"the group is not prunable: {group.reason}")
    if keep.ndim != 1 or keep.size == 0 or np.any(np.diff(keep) <= 0) or keep[0] < 0 or keep[-1] >= group.channels:
        raise ValueError(f"keep must be sorted, distinct, non-empty channel indices below {group.channels}")
    return np.setdiff1d(np.arange(group.channels), keep)


def _refresh_shapes(model: Model) -> None:
    """Forget the constant dims of the main graph's intermediate tensors, which may be old channel counts, and infer
    them again. Symbolic dims stay: no channel count is one, and an exporter's (`Min(512, s41)` for a sliced position
    table) may be more than onnx's inference can find again."""
    boundary = {id(t) for t in [*model.graph.inputs, *model.graph.outputs]}
    for tensor in model.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary and tensor.shape is not None:
            tensor.shape = [d if isinstance(d, str) else None for d in tensor.shape]
    infer_shapes(model)
