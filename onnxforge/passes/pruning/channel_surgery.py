"""Removing a channel group's channels: slice every weight that holds them, so the model stays valid."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model, infer_shapes
from onnxforge.ir.edit import make_constant
from onnxforge.passes.pruning.channel_groups import ChannelGroup, ChannelSlot


def remove_channels(model: Model, group: ChannelGroup, keep: np.ndarray) -> None:
    """Keep only the channels `keep` (sorted indices) of a prunable `group` of `model`'s main graph, in place.

    Producers, followers and consumers get new sliced constants (existing arrays are never written to);
    depthwise Convs get their group count lowered; tensor shapes are inferred again.
    """
    keep = np.asarray(keep, dtype=np.int64)
    if not group.prunable:
        raise ValueError(f"the group is not prunable: {group.reason}")
    if keep.ndim != 1 or keep.size == 0 or np.any(np.diff(keep) <= 0) or keep[0] < 0 or keep[-1] >= group.channels:
        raise ValueError(f"keep must be sorted, distinct, non-empty channel indices below {group.channels}")
    removed = np.setdiff1d(np.arange(group.channels), keep)
    # One input may hold the group several times (a Concat of a tensor with itself): slice it once.
    dropped: dict[tuple[int, int], tuple[ChannelSlot, list[np.ndarray]]] = {}
    for slot in group.slots:
        entry = dropped.setdefault((id(slot.node), slot.input_index), (slot, []))
        if entry[0].axis != slot.axis:
            raise ValueError(f"input {slot.input_index} of '{slot.node.name}' is sliced on two axes")
        entry[1].append(slot.positions(removed))
    for slot, positions in dropped.values():
        values = slot.tensor.values
        kept = np.delete(np.arange(values.shape[slot.axis]), np.concatenate(positions))
        slot.node.inputs[slot.input_index] = make_constant(model.graph, slot.tensor.name, values.take(kept, slot.axis))
    for slot in group.followers:
        # A Conv whose weight follows the channels (on its output axis) is depthwise: one group per channel.
        if slot.node.op == "Conv" and slot.input_index == 1:
            slot.node.attrs["group"] -= removed.size
    _refresh_shapes(model)


def _refresh_shapes(model: Model) -> None:
    """Forget the intermediate shapes of the main graph, which may hold old channel counts, and infer them again."""
    boundary = {id(t) for t in [*model.graph.inputs, *model.graph.outputs]}
    for tensor in model.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary:
            tensor.shape = None
    infer_shapes(model)
