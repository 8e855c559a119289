"""Latency statistics shared by every backend: time a callable, summarise per-run times."""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from onnxforge.errors import OnnxforgeError

# Who hears how timings get on (`timing_progress`). A context variable, so that a timing reports from wherever it runs
# (a backend's `measure`, a pass's decision, a search's trial) without a progress argument through each of them.
_listener: ContextVar[Callable[[str], None] | None] = ContextVar("timing progress", default=None)
# `measure_latency` reports its runs once per this many seconds of them.
REPORT_EVERY_S = 0.5


@dataclass(frozen=True)
class LatencyStats:
    """Summary of the timed runs of one model; times in milliseconds unless the name says otherwise.

    `spread` is the relative spread `(p90_ms - min_ms) / median_ms`: 0 for perfectly steady runs,
    0.1 when the slowest tenth starts 10% of the median above the fastest run. It ignores the
    slowest 10% on purpose, so one stray pause does not condemn a measurement.
    `p90_ms` is the 90th percentile with linear interpolation between neighbouring runs.
    `total_s` is the sum of the timed runs, warm-up excluded.
    """

    median_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    spread: float
    repeats: int
    warmup: int
    total_s: float

    def to_dict(self) -> dict[str, float | int]:
        """Return the statistics as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MeasureOptions:
    """How long to time: repeat until both minimums are met, never beyond either maximum."""

    warmup: int = 5
    min_repeats: int = 20
    min_time_s: float = 1.0
    max_repeats: int = 10000
    max_time_s: float = 60.0

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise OnnxforgeError(f"warm-up runs must be 0 or more, got {self.warmup}")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise OnnxforgeError(
                f"repeats must satisfy 1 <= min ({self.min_repeats}) <= max ({self.max_repeats}); "
                "raise the maximum or lower the minimum"
            )
        if not 0 <= self.min_time_s <= self.max_time_s:
            raise OnnxforgeError(
                f"time limits must satisfy 0 <= min ({self.min_time_s} s) <= max ({self.max_time_s} s); "
                "raise the maximum or lower the minimum"
            )


def latency_stats_from_times(times_s: Sequence[float], warmup: int) -> LatencyStats:
    """Summarise per-run times in seconds (warm-up runs already left out) as `LatencyStats`.

    For backends that time runs themselves; `warmup` is only recorded, not subtracted.
    """
    if len(times_s) == 0:
        raise ValueError("latency statistics need at least one timed run")
    times_ms = np.asarray(times_s, dtype=np.float64) * 1e3
    median = float(np.median(times_ms))
    p90 = float(np.percentile(times_ms, 90))
    fastest = float(times_ms.min())
    return LatencyStats(
        median_ms=median,
        p90_ms=p90,
        min_ms=fastest,
        max_ms=float(times_ms.max()),
        mean_ms=float(times_ms.mean()),
        spread=(p90 - fastest) / median if median > 0 else 0.0,
        repeats=len(times_ms),
        warmup=warmup,
        total_s=float(times_ms.sum()) / 1e3,
    )


@contextmanager
def timing_progress(progress: Callable[[str], None]) -> Iterator[None]:
    """Within the block, timings in this thread tell `progress` how they get on, between runs and rounds (never
    inside one): `timing run 40/200` (the runs expected at the pace so far), `timing round 2/5`."""
    token = _listener.set(progress)
    try:
        yield
    finally:
        _listener.reset(token)


def measure_latency(run: Callable[[], object], options: MeasureOptions = MeasureOptions()) -> LatencyStats:
    """Time `run()` after warm-up until both `min_repeats` and `min_time_s` are met, then summarise.

    Stops early at `max_repeats` runs or `max_time_s` seconds of timed runs, whichever comes first.
    """
    for _ in range(options.warmup):
        run()
    min_ns, max_ns = options.min_time_s * 1e9, options.max_time_s * 1e9
    times_ns: list[int] = []
    elapsed_ns = 0
    say = _listener.get()
    report_ns = REPORT_EVERY_S * 1e9 if say is not None else math.inf
    reported = False
    # A collection pause lands on an arbitrary run and inflates the tail; timeit disables gc too.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            start = time.perf_counter_ns()
            run()
            took = time.perf_counter_ns() - start
            times_ns.append(took)
            elapsed_ns += took
            count = len(times_ns)
            if count >= options.max_repeats or elapsed_ns >= max_ns:
                break
            if count >= options.min_repeats and elapsed_ns >= min_ns:
                break
            if elapsed_ns >= report_ns:
                say(f"timing run {count}/{_expected_runs(count, elapsed_ns, options)}")
                report_ns, reported = elapsed_ns + REPORT_EVERY_S * 1e9, True
    finally:
        if gc_was_enabled:
            gc.enable()
    if reported:  # its bar ends full
        say(f"timing run {len(times_ns)}/{len(times_ns)}")
    return latency_stats_from_times([t / 1e9 for t in times_ns], warmup=options.warmup)


def _expected_runs(count: int, elapsed_ns: float, options: MeasureOptions) -> int:
    """How many runs `measure_latency` will take in all at the pace of its first `count` (more than `count`)."""
    per_run_ns = max(elapsed_ns / count, 1.0)
    wanted = max(options.min_repeats, math.ceil(options.min_time_s * 1e9 / per_run_ns))
    return max(count + 1, min(wanted, options.max_repeats, math.ceil(options.max_time_s * 1e9 / per_run_ns)))


@dataclass(frozen=True)
class InterleavedTiming:
    """How to time models against each other: `blocks` rounds of one block per model, each block at least
    `block_s` seconds (sized on the first model) and `min_runs` runs, after `warmup` runs of each."""

    blocks: int = 5
    block_s: float = 0.2
    min_runs: int = 3
    warmup: int = 3


@dataclass(frozen=True)
class RelativeLatency:
    """One model's latency in an interleaved run, and its speed relative to the first model (above 1: faster).

    `speedup` is the median over rounds of (first model's block median / this block median), which cancels
    slow drift of the machine; `speedup_iqr` its quartiles over rounds. The first model's speedup is 1.
    """

    stats: LatencyStats
    speedup: float
    speedup_iqr: tuple[float, float]
    block_speedups: tuple[float, ...]
    runs_per_block: int


def interleaved_latency(runs: Sequence[Callable[[], object]], timing: InterleavedTiming) -> list[RelativeLatency]:
    """Time several models in interleaved blocks (A, B, C, A, B, C, ...); the first is the baseline.

    Each model must sleep its idle threads (no spinning): a spinning pool steals the cores of the model
    timed after it and makes the ratios wrong (benchmarks/README.md, "How two models are timed in one process").
    """
    for _ in range(timing.warmup):
        for run in runs:
            run()
    probe = float(np.median([_timed(runs[0]) for _ in range(3)]))
    count = max(timing.min_runs, math.ceil(timing.block_s / max(probe, 1e-6)))
    times: list[list[float]] = [[] for _ in runs]
    ratios: list[list[float]] = [[] for _ in runs]
    say = _listener.get() or (lambda line: None)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for number in range(1, timing.blocks + 1):
            blocks = [[_timed(run) for _ in range(count)] for run in runs]
            for index, block in enumerate(blocks):
                times[index] += block
                ratios[index].append(float(np.median(blocks[0]) / np.median(block)))
            say(f"timing round {number}/{timing.blocks}")
    finally:
        if gc_was_enabled:
            gc.enable()
    return [_relative(model_times, ratios[index], timing.warmup, count) for index, model_times in enumerate(times)]


def interleaved_device_latency(
    measures: Sequence[Callable[[MeasureOptions], LatencyStats]], timing: InterleavedTiming
) -> list[RelativeLatency]:
    """Like `interleaved_latency`, for models a backend times itself (on the device or a remote board: TVM's time
    evaluator): `blocks` rounds of one block per model, each block `measures[i](options)` with at least `min_runs`
    runs and `block_s` seconds; the first model is the baseline."""
    block = MeasureOptions(warmup=timing.warmup, min_repeats=timing.min_runs, min_time_s=timing.block_s)
    say = _listener.get() or (lambda line: None)
    rounds = []
    for number in range(1, timing.blocks + 1):
        rounds.append([measure(block) for measure in measures])
        say(f"timing round {number}/{timing.blocks}")
    return [
        _relative(
            [blocks[index].median_ms / 1e3 for blocks in rounds],
            [blocks[0].median_ms / max(blocks[index].median_ms, 1e-9) for blocks in rounds],
            timing.warmup,
            min(blocks[index].repeats for blocks in rounds),
        )
        for index in range(len(measures))
    ]


def _relative(times_s: list[float], ratios: list[float], warmup: int, runs_per_block: int) -> RelativeLatency:
    """One model of an interleaved timing: its latency over `times_s`, its speedup the median of the rounds'
    `ratios` (baseline block over this one), with their quartiles."""
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return RelativeLatency(
        stats=latency_stats_from_times(times_s, warmup=warmup),
        speedup=float(q50),
        speedup_iqr=(float(q25), float(q75)),
        block_speedups=tuple(round(r, 4) for r in ratios),
        runs_per_block=runs_per_block,
    )


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - start) / 1e9
