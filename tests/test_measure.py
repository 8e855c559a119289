import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxforge.errors import OnnxforgeError
import time

from onnxforge.measure import (
    InterleavedTiming,
    LatencyStats,
    MeasureOptions,
    interleaved_latency,
    latency_stats_from_times,
    measure_latency,
)


def test_stats_from_known_times_are_exact():
    times_s = [t / 1000 for t in (5, 1, 3, 2, 4, 6, 7, 8, 9, 10, 11)]  # 1..11 ms, shuffled

    stats = latency_stats_from_times(times_s, warmup=3)

    assert stats.median_ms == pytest.approx(6.0)
    assert stats.p90_ms == pytest.approx(10.0)  # linear interpolation: 1 + 0.9 * 10
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.max_ms == pytest.approx(11.0)
    assert stats.mean_ms == pytest.approx(6.0)
    assert stats.spread == pytest.approx((10.0 - 1.0) / 6.0)
    assert stats.repeats == 11
    assert stats.warmup == 3
    assert stats.total_s == pytest.approx(0.066)


def test_steady_times_have_zero_spread():
    stats = latency_stats_from_times([0.002] * 10, warmup=0)

    assert stats.spread == pytest.approx(0.0)
    assert stats.median_ms == pytest.approx(2.0)


def test_stats_need_at_least_one_time():
    with pytest.raises(ValueError):
        latency_stats_from_times([], warmup=0)


def test_to_dict_holds_every_field():
    stats = latency_stats_from_times([0.001, 0.002], warmup=1)

    as_dict = stats.to_dict()

    assert set(as_dict) == {f for f in LatencyStats.__dataclass_fields__}
    assert as_dict["repeats"] == 2


@given(st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=1, max_size=50))
def test_stats_are_ordered(times_s):
    stats = latency_stats_from_times(times_s, warmup=0)

    tolerance = 1e-9
    assert stats.min_ms - tolerance <= stats.median_ms <= stats.p90_ms + tolerance
    assert stats.p90_ms <= stats.max_ms + tolerance
    assert stats.min_ms - tolerance <= stats.mean_ms <= stats.max_ms + tolerance
    assert stats.spread >= 0


def test_measure_runs_warmup_then_min_repeats():
    calls = []
    options = MeasureOptions(warmup=3, min_repeats=7, min_time_s=0.0)

    stats = measure_latency(lambda: calls.append(1), options)

    assert stats.repeats == 7
    assert stats.warmup == 3
    assert len(calls) == 10


def test_measure_keeps_going_until_min_time():
    options = MeasureOptions(warmup=0, min_repeats=1, min_time_s=0.02, max_repeats=100000)

    stats = measure_latency(lambda: sum(range(1000)), options)

    assert stats.total_s >= 0.02
    assert stats.repeats > 1


def test_measure_stops_at_max_repeats_before_min_time():
    options = MeasureOptions(warmup=0, min_repeats=5, min_time_s=30.0, max_repeats=5)

    stats = measure_latency(lambda: None, options)

    assert stats.repeats == 5


def test_measure_stops_at_max_time_before_min_repeats():
    options = MeasureOptions(warmup=0, min_repeats=10000, min_time_s=0.0, max_repeats=10000, max_time_s=0.0)

    stats = measure_latency(lambda: None, options)

    assert stats.repeats == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup": -1},
        {"min_repeats": 0},
        {"min_repeats": 10, "max_repeats": 5},
        {"min_time_s": 2.0, "max_time_s": 1.0},
        {"min_time_s": -1.0},
    ],
)
def test_bad_measure_options_raise_user_error(kwargs):
    with pytest.raises(OnnxforgeError):
        MeasureOptions(**kwargs)


def test_interleaved_latency_runs_every_model_alike_and_gives_speedups_against_the_first():
    calls = {"fast": 0, "slow": 0}

    def run(name: str, seconds: float):
        def call():
            calls[name] += 1
            time.sleep(seconds)

        return call

    timing = InterleavedTiming(blocks=3, block_s=0.01, min_runs=2, warmup=1)
    slow, fast = interleaved_latency([run("slow", 0.004), run("fast", 0.002)], timing)
    assert calls["slow"] == calls["fast"] + 3  # the same warm-up and runs per block, plus the baseline's probe
    assert slow.speedup == 1.0 and len(fast.block_speedups) == 3
    assert 1.3 < fast.speedup < 2.5  # 4 ms against 2 ms of sleep, give or take the scheduler
    assert fast.stats.repeats == fast.runs_per_block * 3
