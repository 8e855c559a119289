"""How far a candidate model's outputs are from the reference's, on plain arrays: the trained cases' metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def embedding_cosines(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarity of each candidate embedding with its reference (float64, one per pair)."""
    ref = np.stack([np.asarray(r, np.float64).ravel() for r in reference])
    cand = np.stack([np.asarray(c, np.float64).ravel() for c in candidate])
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30)


def decisions_unchanged(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> float:
    """Fraction of positions where `value > threshold` is the same in both arrays."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    return float(np.mean((reference > threshold) == (candidate > threshold)))


def positive_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> float:
    """Intersection over union of the positions above `threshold` in both arrays (1.0 when both have none)."""
    ref, cand = np.asarray(reference) > threshold, np.asarray(candidate) > threshold
    union = np.count_nonzero(ref | cand)
    return 1.0 if union == 0 else np.count_nonzero(ref & cand) / union


def relative_l2(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """||candidate - reference|| / ||reference||, pooled over every array."""
    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
    cand = np.concatenate([np.asarray(c, np.float64).ravel() for c in candidate])
    return float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-30))


def max_abs_difference(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Largest absolute difference over every pair of arrays."""
    return max(float(np.max(np.abs(np.asarray(c, np.float64) - r))) for r, c in zip(reference, candidate))
