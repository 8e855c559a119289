"""Activation ranges (minmax, percentile, entropy) on known distributions, and the range-to-grid formula."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxforge.passes.quantization.ranges import RangeObserver, code_range, scale_and_zero_point


def _observed(values: np.ndarray, chunks: int = 1) -> RangeObserver:
    observer = RangeObserver()
    for chunk in np.array_split(values, chunks):
        observer.observe(chunk)
    return observer


def _gaussian_with_outliers() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.permutation(np.concatenate([rng.standard_normal(100_000), np.full(5, 1000.0)]))


def test_minmax_of_uniform_is_its_support():
    observer = _observed(np.random.default_rng(0).uniform(-1, 3, 100_000))
    low, high = observer.range("minmax")
    assert low == pytest.approx(-1, abs=1e-3) and high == pytest.approx(3, abs=1e-3)
    assert observer.range("minmax", symmetric=True) == (-high, high)


def test_percentile_of_standard_normal_matches_its_quantiles():
    observer = _observed(np.random.default_rng(0).standard_normal(1_000_000))
    low, high = observer.range("percentile", percentile=99.9, symmetric=True)
    assert high == pytest.approx(3.2905, rel=0.02) and low == -high
    low, high = observer.range("percentile", percentile=99.9)
    assert low == pytest.approx(-3.0902, rel=0.02) and high == pytest.approx(3.0902, rel=0.02)


def test_entropy_and_percentile_ignore_a_few_huge_outliers():
    observer = _observed(_gaussian_with_outliers())
    assert observer.range("minmax")[1] == 1000
    for symmetric in (False, True):
        low, high = observer.range("entropy", symmetric=symmetric)
        assert 3 < high < 20 and -20 < low < -3
        low, high = observer.range("percentile", percentile=99.99, symmetric=symmetric)
        assert 3 < high < 20 and -20 < low < -3


def test_entropy_clips_harder_for_fewer_bits():
    observer = _observed(np.random.default_rng(0).standard_normal(200_000))
    _, int8_threshold = observer.range("entropy", bits=8, symmetric=True)
    _, int4_threshold = observer.range("entropy", bits=4, symmetric=True)
    assert 2 < int4_threshold < int8_threshold <= observer.maximum


def test_entropy_of_nonnegative_data_keeps_low_at_zero():
    observer = _observed(np.maximum(np.random.default_rng(0).standard_normal(100_000), 0))
    low, high = observer.range("entropy")
    assert low == 0 and 2 < high <= observer.maximum


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_observing_in_chunks_gives_the_range_of_observing_at_once(method, symmetric):
    values = _gaussian_with_outliers()
    at_once = _observed(values).range(method, percentile=99.99, symmetric=symmetric)
    chunked = _observed(values, chunks=7).range(method, percentile=99.99, symmetric=symmetric)
    assert chunked == pytest.approx(at_once, rel=1e-9)


def test_nan_and_infinity_are_ignored():
    observer = _observed(np.array([np.nan, -np.inf, -2.0, 0.5, np.inf]))
    assert observer.range("minmax") == (-2.0, 0.5)


def test_all_zero_activation_has_an_empty_range():
    observer = _observed(np.zeros(100))
    for method in ("minmax", "percentile", "entropy"):
        assert observer.range(method) == (0.0, 0.0)
    assert scale_and_zero_point(0.0, 0.0) == (np.float32(1.0), 0)


def test_range_without_observations_is_an_error():
    with pytest.raises(ValueError):
        RangeObserver().range("minmax")


@given(
    low=st.floats(-1e4, 1e4),
    width=st.floats(0, 1e4),
    bits=st.sampled_from([4, 8]),
    signed=st.booleans(),
    symmetric=st.booleans(),
)
def test_grid_represents_zero_exactly_and_its_range_within_half_a_step(low, width, bits, signed, symmetric):
    high = low + width
    scale, zero_point = scale_and_zero_point(low, high, bits, signed, symmetric)
    code_low, code_high = code_range(bits, signed, symmetric)
    assert isinstance(scale, np.float32) and np.isfinite(scale) and scale > 0
    assert code_low <= zero_point <= code_high
    for value in (0.0, min(low, 0.0), max(high, 0.0)):
        code = np.clip(np.rint(np.float32(value) / scale) + zero_point, code_low, code_high)
        dequantized = (code - zero_point) * scale
        assert abs(dequantized - value) <= scale / 2 * (1 + 1e-5)
        if value == 0.0:
            assert code == zero_point and dequantized == 0.0


def test_a_range_whose_scale_would_be_subnormal_gets_scale_one():
    # Found by the property above: float32 cannot place 2.3e-42 within half of a 1.8e-44 step.
    assert scale_and_zero_point(1.1615018715946602e-42, 2.3230037431893203e-42, 8, False, True) == (np.float32(1), 128)
    assert scale_and_zero_point(-1e-37, 1e-37, 8, True, False)[0] == np.float32(1)
    assert scale_and_zero_point(-1e-30, 1e-30, 8, True, False)[0] < 1


def test_grid_of_arrays_is_the_grid_of_each_element():
    lows, highs = np.array([-1.0, 0.0, 2.0, -3.0]), np.array([3.0, 0.0, 5.0, -1.0])
    scales, zero_points = scale_and_zero_point(lows, highs, bits=4)
    assert scales.dtype == np.float32 and scales.shape == zero_points.shape == (4,)
    for low, high, scale, zero_point in zip(lows, highs, scales, zero_points, strict=True):
        assert scale_and_zero_point(low, high, bits=4) == (scale, zero_point)


def test_symmetric_grids_center_the_zero_point():
    assert scale_and_zero_point(-2.0, 1.0, bits=8, signed=True, symmetric=True) == (np.float32(2 / 127), 0)
    assert scale_and_zero_point(-2.0, 1.0, bits=8, signed=False, symmetric=True) == (np.float32(2 / 127), 128)
    assert scale_and_zero_point(-2.0, 1.0, bits=4, signed=False, symmetric=True) == (np.float32(2 / 7), 8)
