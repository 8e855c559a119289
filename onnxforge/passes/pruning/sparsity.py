"""Weight sparsity that keeps shapes: unstructured magnitude pruning and the 2:4 semi-structured pattern."""

from __future__ import annotations

import numpy as np

# Dense CPU kernels multiply zeros like any other number: what sparsity buys is a smaller compressed file.
SPEED_NOTE = (
    "unstructured and 2:4 sparsity keep every weight's shape: dense CPU kernels (onnxruntime's among them) run "
    "as fast as before; the gain is a smaller compressed file, and speed only on backends with sparse kernels"
)


def magnitude_mask(weight: np.ndarray, ratio: float) -> np.ndarray:
    """True where a weight survives: all but the `ratio` fraction of smallest magnitudes (ties kept)."""
    count = int(ratio * weight.size)
    if count == 0:
        return np.ones(weight.shape, bool)
    threshold = np.partition(np.abs(weight).ravel(), count - 1)[count - 1]
    return np.abs(weight) > threshold


def two_of_four_mask(weight: np.ndarray, axis: int) -> np.ndarray | None:
    """True where a weight survives the 2:4 pattern: the 2 largest magnitudes of every 4 consecutive along
    `axis` (the input axis, as sparse tensor cores read it); None when that axis is not a multiple of 4."""
    if weight.shape[axis] % 4:
        return None
    moved = np.moveaxis(np.abs(weight), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    ranks = np.argsort(np.argsort(groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (ranks >= 2).reshape(moved.shape)
    return np.moveaxis(keep, -1, axis)
