"""Activation ranges from calibration data, and the one formula that turns a range into a scale and zero point."""

from __future__ import annotations

from typing import Literal

import numpy as np

# The histogram is logarithmic: a float32's sign, exponent and top 5 mantissa bits name its bin, so every power
# of two is cut into 32 equal bins (HdrHistogram's layout). One fixed set of bins then covers every float32
# with a relative resolution of 1/32: it never needs re-binning, and a Gaussian body and an outlier 1000 times
# larger are both resolved.
_DROPPED_MANTISSA_BITS = 18
_BINS_PER_SIGN = 1 << (31 - _DROPPED_MANTISSA_BITS)
_FINITE_BINS = 255 << (23 - _DROPPED_MANTISSA_BITS)  # exponent 255 is inf and NaN

# The KL search tries thresholds down to this many octaves below the largest magnitude.
_ENTROPY_OCTAVES = 16
# Each candidate's range [0, t] is resampled into this many linear bins per quantization level.
_ENTROPY_BINS_PER_LEVEL = 8


def code_range(bits: int, signed: bool, symmetric: bool, seven_bit: bool = False) -> tuple[int, int]:
    """The smallest and largest integer code of a `bits`-wide grid.

    Symmetric signed int8 stops at -127 so that the range is symmetric, as onnxruntime's int8 kernels expect.
    `seven_bit` keeps signed int8 codes to 7 bits ([-64, 63], symmetric [-63, 63]): for x86 int8 kernels without
    VNNI, which add two uint8 x int8 products in 16 bits and would overflow with larger weights.
    """
    if signed:
        width = 7 if seven_bit and bits == 8 else bits
        low, high = -(2 ** (width - 1)), 2 ** (width - 1) - 1
        return (-high if symmetric and bits == 8 else low), high
    return 0, 2**bits - 1


def scale_and_zero_point(
    low: np.ndarray | float,
    high: np.ndarray | float,
    bits: int = 8,
    signed: bool = False,
    symmetric: bool = False,
    seven_bit: bool = False,
) -> tuple[np.float32 | np.ndarray, int | np.ndarray]:
    """The scale and zero point that map [low, high] (widened to include 0) onto the integer codes.

    Accepts scalars or arrays (one range per element) and answers in kind: a float32 scale and an int zero
    point, or arrays of them. Symmetric grids put the zero point at 0 (signed) or mid-range (unsigned) and
    map max(|low|, |high|) to the largest code 2**(bits-1) - 1 (63 for `seven_bit`, see code_range). An empty range [0, 0], or one whose scale would be
    below float32's smallest normal number, gets scale 1.
    """
    low = np.minimum(np.asarray(low, dtype=np.float64), 0.0)
    high = np.maximum(np.asarray(high, dtype=np.float64), 0.0)
    code_low, code_high = code_range(bits, signed, symmetric, seven_bit)
    if symmetric:
        width = np.maximum(-low, high) / (code_high if signed else 2 ** (bits - 1) - 1)
    else:
        width = (high - low) / (code_high - code_low)
    # A range too narrow for float32's normal numbers (empty, or so small that its scale would be subnormal, where
    # float32 keeps too few digits to place a value within half a step) gets scale 1: its values code as 0.
    scale = width.astype(np.float32)
    scale = np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1.0))
    if symmetric:
        zero_point = np.full(scale.shape, 0 if signed else 2 ** (bits - 1), dtype=np.int64)
    else:
        zero_point = np.clip(np.rint(code_low - low / scale), code_low, code_high).astype(np.int64)
    if scale.ndim == 0:
        return np.float32(scale), int(zero_point)
    return scale, zero_point


class RangeObserver:
    """Accumulates what calibration samples show of one activation: min, max and a histogram of x.

    The histogram has fixed logarithmic bins over all float32 magnitudes, one set for positive and one for
    negative values; memory is bounded (about 130 KB) whatever the data, and observing the data in chunks
    gives exactly the same histogram as observing it at once.
    """

    def __init__(self) -> None:
        self.minimum = np.inf
        self.maximum = -np.inf
        self._positive = np.zeros(_FINITE_BINS, dtype=np.int64)
        self._negative = np.zeros(_FINITE_BINS, dtype=np.int64)

    def observe(self, values: np.ndarray) -> None:
        """Add one batch of an activation's values; NaN and infinities are ignored (they have no range)."""
        values = np.asarray(values, dtype=np.float32).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        counts = np.bincount(values.view(np.uint32) >> _DROPPED_MANTISSA_BITS, minlength=2 * _BINS_PER_SIGN)
        self._positive += counts[:_FINITE_BINS]
        self._negative += counts[_BINS_PER_SIGN : _BINS_PER_SIGN + _FINITE_BINS]

    def range(
        self,
        method: Literal["minmax", "percentile", "entropy"],
        percentile: float = 99.999,
        bits: int = 8,
        symmetric: bool = False,
    ) -> tuple[float, float]:
        """The range [low, high] to quantize this activation to, by the given method.

        minmax: the observed extremes. percentile: the `percentile` of |x| (symmetric) or the (100 -
        percentile) and `percentile` percentiles of x (asymmetric). entropy: the threshold t on |x| that
        minimizes the KL divergence between the clipped distribution and its quantized version (TensorRT's
        method, see `_entropy_threshold`), intersected with the observed range when asymmetric. Symmetric
        answers are (-t, t).
        """
        if self.minimum > self.maximum:
            raise ValueError("RangeObserver.range called before any finite value was observed")
        largest = max(-self.minimum, self.maximum)
        if largest == 0:
            return 0.0, 0.0
        if method == "minmax":
            return (-largest, largest) if symmetric else (self.minimum, self.maximum)
        if method == "percentile":
            if symmetric:
                edges, counts = self._magnitude_histogram()
                threshold = min(_quantile(edges, counts, percentile / 100), largest)
                return -threshold, threshold
            edges, counts = self._signed_histogram()
            low, high = (_quantile(edges, counts, fraction) for fraction in (1 - percentile / 100, percentile / 100))
            return self._clip(low), self._clip(high)
        if method == "entropy":
            # One-sided data spends every code on one side of zero, so the grid over |x| is twice as fine.
            one_sided = self.minimum >= 0 or self.maximum <= 0
            levels = 2**bits if one_sided and not symmetric else 2 ** (bits - 1)
            edges, counts = self._magnitude_histogram()
            threshold = min(_entropy_threshold(edges, counts, largest, levels), largest)
            if symmetric:
                return -threshold, threshold
            return self._clip(-threshold), self._clip(threshold)
        raise ValueError(f"unknown range method {method!r}")

    def _clip(self, value: float) -> float:
        """`value` moved into the observed range."""
        return min(max(value, self.minimum), self.maximum)

    def _magnitude_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin edges (increasing, from 0) and counts of |x|."""
        return _magnitude_edges(), self._positive + self._negative

    def _signed_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin edges (increasing) and counts of x: the negative bins, then the positive ones."""
        edges = _magnitude_edges()
        return np.concatenate([-edges[::-1], edges[1:]]), np.concatenate([self._negative[::-1], self._positive])


def _magnitude_edges() -> np.ndarray:
    """The edges of the magnitude bins: the float32 whose bits start each bin, then 2**128 (float64)."""
    lower = (np.arange(_FINITE_BINS, dtype=np.uint32) << _DROPPED_MANTISSA_BITS).view(np.float32)
    return np.append(lower.astype(np.float64), 2.0**128)


def _quantile(edges: np.ndarray, counts: np.ndarray, fraction: float) -> float:
    """The value below which `fraction` of the histogram's samples lie, linear within a bin."""
    cumulative = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    return float(np.interp(fraction * cumulative[-1], cumulative, edges))


def _entropy_threshold(edges: np.ndarray, counts: np.ndarray, largest: float, levels: int) -> float:
    """TensorRT's KL-divergence calibration threshold on a histogram of |x|.

    For each candidate threshold t (the log-bin edges from largest / 2**16 up to largest), the distribution of
    |x| on [0, t] is resampled into `levels` * 8 linear bins (uniform density within a log bin); the reference
    P is that with all mass above t added to the last bin; Q merges the clipped bins (without the outliers)
    into `levels` levels and spreads each level's mass evenly over the bins where P is nonzero. The answer is
    the t with the smallest KL(P || Q): it balances clipping error against rounding error.
    """
    candidates = edges[(edges > largest * 2.0**-_ENTROPY_OCTAVES) & (edges < largest)]
    candidates = np.append(candidates, largest)
    bins = levels * _ENTROPY_BINS_PER_LEVEL
    cumulative = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    grid = candidates[:, None] * np.linspace(0.0, 1.0, bins + 1)[None, :]
    clipped = np.diff(np.interp(grid, edges, cumulative), axis=1)
    reference = clipped.copy()
    reference[:, -1] += cumulative[-1] - clipped.sum(axis=1)
    nonzero = reference > 0
    per_level = clipped.reshape(len(candidates), levels, _ENTROPY_BINS_PER_LEVEL).sum(axis=2)
    occupied = nonzero.reshape(len(candidates), levels, _ENTROPY_BINS_PER_LEVEL).sum(axis=2)
    spread = np.divide(per_level, occupied, out=np.zeros_like(per_level), where=occupied > 0)
    quantized = np.where(nonzero, np.repeat(spread, _ENTROPY_BINS_PER_LEVEL, axis=1), 0.0)
    p = reference / reference.sum(axis=1, keepdims=True)
    q = quantized / np.maximum(quantized.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    # A bin where P has mass and Q none (outliers beyond an empty level) costs a large but finite penalty.
    q = np.maximum(q, 1e-12)
    divergence = np.sum(np.where(nonzero, p * np.log(np.where(nonzero, p, 1.0) / q), 0.0), axis=1)
    return float(candidates[np.argmin(divergence)])
