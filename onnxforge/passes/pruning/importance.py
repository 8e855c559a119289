"""How much each channel of a group matters: from its producers' weights, or from calibration activations.

- l1, l2: the norm of the weights that make the channel, each producer scaled to mean 1 so that layers compare.
- activation: the mean magnitude E|x| of the channel where its consumers read it.
- taylor-free: E[x^2] * |w|^2, the expected squared change of each consumer's output when the channel is
  removed (w: the consumer weights that read it); a first-order (Taylor) criterion without gradients or labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.statistics import ChannelMoments, channel_moments
from onnxforge.data import Sample
from onnxforge.ir import Model
from onnxforge.passes.pruning.channel_groups import ChannelGroup, ChannelSlot

DATA_METHODS = ("activation", "taylor-free")


def input_statistics(
    model: Model, groups: Sequence[ChannelGroup], samples: Sequence[Sample], calibration: Calibration
) -> dict[str, ChannelMoments]:
    """The channel moments of every input that the groups' consumers read their channels from, by tensor name."""
    axes = {slot.node.inputs[0].name: _channel_axis(slot.node) for group in groups for slot in group.consumers}
    return channel_moments(model, axes, samples, calibration)


def channel_importance(
    group: ChannelGroup, method: str, statistics: dict[str, ChannelMoments] | None = None
) -> np.ndarray:
    """Each channel's importance by `method`; the data methods need `statistics` from `input_statistics`."""
    if method in DATA_METHODS and group.consumers:
        return _summed(group, group.consumers, lambda slot: _data_scores(slot, method, statistics))
    return _summed(group, group.producers, lambda slot: _weight_norms(slot, "l2" if method == "l2" else "l1"))


def _summed(group: ChannelGroup, slots: list[ChannelSlot], per_position) -> np.ndarray:
    """The sum over slots of each channel's score, each slot's scores scaled to mean 1."""
    total = np.zeros(group.channels)
    for slot in slots:
        scores = per_position(slot)[slot.positions(np.arange(group.channels))].reshape(group.channels, -1).sum(1)
        total += scores / max(float(scores.mean()), 1e-30)
    return total


def _weight_norms(slot: ChannelSlot, norm: str) -> np.ndarray:
    rows = _rows(slot)
    return np.abs(rows).sum(1) if norm == "l1" else np.sqrt(np.square(rows).sum(1))


def _data_scores(slot: ChannelSlot, method: str, statistics: dict[str, ChannelMoments]) -> np.ndarray:
    stats = statistics[slot.node.inputs[0].name]
    if method == "activation":
        return stats.abs_mean
    return stats.square_mean * np.square(_rows(slot)).sum(1)


def _rows(slot: ChannelSlot) -> np.ndarray:
    """The slot's weight with its channel axis first, one row per position."""
    values = np.asarray(slot.tensor.values, np.float64)
    return np.moveaxis(values, slot.axis, 0).reshape(values.shape[slot.axis], -1)


def _channel_axis(node: gs.Node) -> int:
    return 1 if node.op in ("Conv", "ConvTranspose") else -1
