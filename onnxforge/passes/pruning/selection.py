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
import onnx_graphsurgeon as gs

from onnxforge.calibration.observe import Sample, observed, sampled_rows
from onnxforge.calibration.recovery import MAX_ROWS, design_columns, design_weights, input_rows, ridge_strength
from onnxforge.ir import Model
from onnxforge.pipeline.context import PassContext
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
    model: Model, groups: Sequence[ChannelGroup], samples: Sequence[Sample], ctx: PassContext
) -> dict[int, np.ndarray]:
    """The Gram matrix of each group reader's design rows (those recovery fits) over the samples, by node id."""
    readers = list({id(slot.node): slot.node for group in groups for slot in group.consumers}.values())
    names = list(dict.fromkeys(t.name for node in readers for t in (node.inputs[0], node.outputs[0])))
    rng = np.random.default_rng(2)
    per_sample = MAX_ROWS // max(len(samples), 1) + 1
    grams: dict[int, np.ndarray] = {}
    with_bias = {id(node): design_weights(node)[1] for node in readers}
    for sample, seen in observed(model, names, samples, ctx):
        for node in readers:
            x, y = seen[node.inputs[0].name], seen[node.outputs[0].name]
            positions = sampled_rows(sample, _positions(node, y), per_sample, rng)
            rows = input_rows(node, x, positions, y.shape, with_bias[id(node)])
            grams[id(node)] = grams.get(id(node), 0) + rows.T @ rows
    return grams


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
        columns.append(design_columns(slot.node, slot.positions(np.arange(group.channels))).reshape(group.channels, -1))
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


def _positions(node: gs.Node, output: np.ndarray) -> int:
    """How many output positions (rows of the fit) the reader has on one sample."""
    if node.op in ("Conv", "ConvTranspose"):
        return output.shape[0] * int(np.prod(output.shape[2:]))
    return int(np.prod(output.shape[:-1]))
