"""Which channels of a group to keep when recovery refits their readers: those that best stand in for the rest.

Importance judges each channel alone, as if its readers kept their weights. After a refit, what a removed channel
carried is lost only where the kept channels cannot reproduce it: of two correlated channels one may go at little
cost, however important both are. So, with recovery, channels go one at a time, each time the one whose removal
raises the readers' refitted output error least: Optimal Brain Surgeon on each reader's least-squares problem
(as in ThiNet and OBC), from the Gram matrix of what the reader reads on the calibration samples. The error sums
over a group's readers, each relative to the energy of its outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.recovery import MAX_ROWS, design_weights, ridge_strength
from onnxforge.calibration.statistics import input_moments
from onnxforge.data import Sample
from onnxforge.ir import Model
from onnxforge.ir.layers import as_layer
from onnxforge.passes.pruning.channel_groups import ChannelGroup

# Ridge of the reader's fit, relative to its mean squared input, as in recovery's weakest tried strengths: it keeps
# the Gram matrix invertible where channels are exactly dependent (a channel that is always 0).
RIDGE = 1e-3
# The cheapest few channels go together (their joint removal is exact, only their choice approximate), so that
# a wide group takes at most ROUNDS updates of its readers' fits.
ROUNDS = 64


@dataclass
class ReaderFit:
    """One reader's least-squares problem as channels go: the inverse of its (ridged) Gram matrix, and its
    weights refitted to what it computed before (both [design columns, ...])."""

    inverse: np.ndarray
    weights: np.ndarray
    scale: float  # 1 / the energy of the reader's outputs, so that readers compare

    def costs(self, columns: np.ndarray) -> np.ndarray:
        """The rise of the squared output error (scaled) for removing each row of `columns` [channels, block]."""
        weights = self.weights[columns]
        if columns.shape[1] == 1:  # one design column a channel (MatMul, 1x1 Conv): no block to invert
            energy = np.einsum("nbo,nbo->n", weights, weights)
            return energy / np.diagonal(self.inverse)[columns[:, 0]] * self.scale
        block = self.inverse[columns[:, :, None], columns[:, None, :]]
        return np.einsum("nbo,nbo->n", weights, np.linalg.solve(block, weights)) * self.scale

    def remove(self, columns: np.ndarray) -> None:
        """Refit without `columns`: the OBS update of the weights and of the inverse Gram matrix."""
        block = np.linalg.inv(self.inverse[np.ix_(columns, columns)])
        sideways = self.inverse[:, columns] @ block
        self.weights -= sideways @ self.weights[columns]
        self.inverse -= sideways @ self.inverse[columns, :]
        self.weights[columns] = 0


def reader_grams(
    model: Model, groups: Sequence[ChannelGroup], samples: Sequence[Sample], calibration: Calibration
) -> dict[int, np.ndarray]:
    """The Gram matrix of each group reader's design rows (those recovery fits, with its bias's column) over the
    samples, at most MAX_ROWS rows at random positions in all, by node id."""
    readers = list({id(slot.node): slot.node for group in groups for slot in group.consumers}.values())
    per_sample = MAX_ROWS // max(len(samples), 1) + 1
    layers = [as_layer(node) for node in readers]
    moments = input_moments(model, layers, samples, calibration, rows_per_sample=per_sample, seed=2, bias=True)
    return {id(node): moment.gram for node, moment in zip(readers, moments)}


def kept_for_refit(group: ChannelGroup, count: int, grams: dict[int, np.ndarray]) -> np.ndarray:
    """The sorted channels to keep when `count` of the group's channels go and recovery refits its readers."""
    if count == 0:
        return np.arange(group.channels)
    fits, columns = [], []
    for slot in group.consumers:
        gram = grams[id(slot.node)]
        weights, _ = design_weights(slot.node)
        ridged = gram + ridge_strength(gram, RIDGE) * np.eye(len(gram))
        energy = float(np.sum(weights * (gram @ weights)))
        fits.append(ReaderFit(np.linalg.inv(ridged), weights.copy(), 1 / max(energy, 1e-30)))
        rows = as_layer(slot.node).matrix_rows(slot.positions(np.arange(group.channels)))
        columns.append(rows.reshape(group.channels, -1))
    alive, left, per_round = np.ones(group.channels, bool), count, -(-count // ROUNDS)
    while left:
        candidates = np.flatnonzero(alive)
        costs = sum(fit.costs(block[candidates]) for fit, block in zip(fits, columns))
        chosen = candidates[np.argsort(costs, kind="stable")[: min(per_round, left)]]
        for fit, block in zip(fits, columns):
            fit.remove(block[chosen].ravel())
        alive[chosen] = False
        left -= chosen.size
    return np.flatnonzero(alive)

