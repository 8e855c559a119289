"""Low-rank factors of a weight matrix: W (m x n) ~ A (m x r) @ B (r x n), from its SVD, plain or whitened.

Plain SVD keeps the largest singular values of W, so it minimizes the weight error |W - AB|. Whitened SVD
minimizes the error of the layer's outputs on its calibration inputs X, |XW - XAB|: with XᵀX = LLᵀ that is
|Lᵀ(W - AB)|, so it truncates the SVD of LᵀW and maps the left factor back through L⁻ᵀ. Directions the inputs
never take cost nothing there, so the same rank keeps much more of what the layer computes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DAMPING = 1e-6  # added to the second-moment matrix, relative to its mean diagonal, so that Cholesky works


@dataclass
class Spectrum:
    """The SVD of a weight, or of its whitened form: what each rank keeps, and its factors."""

    u: np.ndarray  # [m, k]
    s: np.ndarray  # [k], descending
    vt: np.ndarray  # [k, n]
    unwhiten: np.ndarray | None = None  # L⁻ᵀ [m, m], for whitened spectra

    @property
    def full_rank(self) -> int:
        return len(self.s)

    def energy(self, rank: int) -> float:
        """Fraction of the squared singular values (weight or output energy) that `rank` keeps."""
        total = float(np.sum(self.s**2))
        return float(np.sum(self.s[:rank] ** 2)) / total if total > 0 else 1.0

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank that keeps at least `energy` of it (at least 1)."""
        kept = np.cumsum(self.s**2) / max(float(np.sum(self.s**2)), 1e-300)
        return min(int(np.searchsorted(kept, energy - 1e-12)) + 1, self.full_rank)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A [m, rank] and B [rank, n], the singular values split evenly between them."""
        root = np.sqrt(self.s[:rank])
        a, b = self.u[:, :rank] * root, root[:, None] * self.vt[:rank]
        return (a if self.unwhiten is None else self.unwhiten @ a), b


def spectrum(weight: np.ndarray, second_moment: np.ndarray | None = None) -> Spectrum:
    """The spectrum of `weight` [m, n]; whitened by the inputs' second-moment matrix XᵀX [m, m] when given."""
    weight = np.asarray(weight, np.float64)
    if second_moment is None:
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        return Spectrum(u, s, vt)
    gram = np.asarray(second_moment, np.float64)
    damping = DAMPING * max(float(np.trace(gram)) / len(gram), 1e-12)
    lower = np.linalg.cholesky(gram + damping * np.eye(len(gram)))
    u, s, vt = np.linalg.svd(lower.T @ weight, full_matrices=False)
    return Spectrum(u, s, vt, np.linalg.inv(lower.T))


def ranks_for_budget(
    spectra: Sequence[Spectrum],
    shapes: Sequence[tuple[int, int]],
    fraction: float,
    worth: Sequence[np.ndarray] | None = None,
    max_kept: float | None = None,
) -> list[int]:
    """Ranks that keep the most worth within `fraction` of the layers' parameters.

    Each singular value is worth `worth[layer][index]`; by default its energy relative to its own layer's.
    Greedy: every layer starts at rank 1, then the next singular value worth the most per parameter (m + n for
    one more rank) is added, anywhere, while the factors' parameters stay within the budget. With `max_kept`, a
    layer's rank stops where its factors would cost more than that fraction of its m n parameters, and keeping
    it whole (its full rank, m n parameters, all its values) becomes its next step.
    """
    if worth is None:
        worth = [spec.s**2 / max(float(np.sum(spec.s**2)), 1e-300) for spec in spectra]
    budget = fraction * sum(m * n for m, n in shapes)
    ranks = [1] * len(spectra)
    used = sum(m + n for m, n in shapes)
    steps: list[tuple[float, int, int, bool]] = []  # (-worth per parameter, -layer, parameters, whole)

    def add_next_step(index: int) -> None:
        (m, n), rank, values = shapes[index], ranks[index], worth[index]
        last = len(values) if max_kept is None else min(int(max_kept * m * n / (m + n)), len(values))
        if rank < last:
            heapq.heappush(steps, (-float(values[rank]) / (m + n), -index, m + n, False))
        elif max_kept is not None and rank < len(values):
            cost = m * n - rank * (m + n)
            heapq.heappush(steps, (-float(np.sum(values[rank:])) / max(cost, 1), -index, cost, True))

    for index in range(len(spectra)):
        add_next_step(index)
    while steps:  # the best step pops first; a layer's come in order, and once one does not fit it is done
        _, index, cost, whole = heapq.heappop(steps)
        if used + cost <= budget:
            used += cost
            ranks[-index] = len(worth[-index]) if whole else ranks[-index] + 1
            add_next_step(-index)
    return ranks
