"""Time onnxruntime sessions in one process, in interleaved blocks, and report their speed ratios.

Shared by the benchmarks: sessions are timed in rounds of one block each (A, B, A, B, ... or A, B, C, A, B, C,
...), every block the same number of runs, and a speedup is the median over rounds of the ratio of block
medians, which cancels slow drift of the machine. Create the sessions with thread spinning off
(`BackendOptions(allow_spinning=False)`): a spinning pool steals the cores of the session timed after it.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxforge.measure import latency_stats_from_times
from onnxforge.report import write_json


@dataclass
class Timing:
    """How long to time: `blocks` rounds of blocks, each at least `block_s` seconds and `min_runs` runs."""

    blocks: int
    block_s: float
    min_runs: int
    warmup: int


def time_block(session, feed: dict, runs: int) -> list[float]:
    """Run an onnxruntime session `runs` times; return each run's seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        session.run(None, feed)
        times.append((time.perf_counter_ns() - start) / 1e9)
    return times


def interleaved_timing(sessions: Sequence, feed: dict, timing: Timing) -> list[dict]:
    """Time sessions in interleaved blocks; the first is the baseline the others' speedups are relative to.

    Returns one dict per session: `stats` (latency over all its runs) and, for all but the first, `speedup`
    (median over rounds of baseline block median / this block median; above 1 is faster), `speedup_iqr`,
    `speedup_of_pooled_medians` and `block_speedups`.
    """
    for _ in range(timing.warmup):
        for session in sessions:
            session.run(None, feed)
    # Every session gets the same number of runs per block, sized so the baseline's block lasts block_s.
    probe = float(np.median(time_block(sessions[0], feed, 3)))
    runs = max(timing.min_runs, math.ceil(timing.block_s / max(probe, 1e-6)))
    times: list[list[float]] = [[] for _ in sessions]
    ratios: list[list[float]] = [[] for _ in sessions]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(timing.blocks):
            blocks = [time_block(session, feed, runs) for session in sessions]
            for index, block in enumerate(blocks):
                times[index] += block
                ratios[index].append(float(np.median(blocks[0]) / np.median(block)))
    finally:
        if gc_was_enabled:
            gc.enable()
    stats = [latency_stats_from_times(t, warmup=timing.warmup) for t in times]
    results = []
    for index, summary in enumerate(stats):
        result = {"stats": summary.to_dict(), "runs_per_block": runs}
        if index > 0:
            # The median over rounds ignores the rounds another process disturbed on one side only.
            q25, q50, q75 = np.percentile(ratios[index], [25, 50, 75])
            result.update(
                speedup=float(q50),
                speedup_iqr=[round(float(q25), 4), round(float(q75), 4)],
                speedup_of_pooled_medians=stats[0].median_ms / summary.median_ms,
                block_speedups=[round(r, 4) for r in ratios[index]],
            )
        results.append(result)
    return results


def paired_timing(before, after, feed: dict, timing: Timing) -> dict:
    """Time two prepared models in interleaved blocks A, B, A, B, ...; return both summaries and the ratio."""
    baseline, other = interleaved_timing([before.session, after.session], feed, timing)
    return {
        "before": baseline["stats"],
        "after": other["stats"],
        "speedup": other["speedup"],
        "speedup_iqr": other["speedup_iqr"],
        "speedup_of_pooled_medians": other["speedup_of_pooled_medians"],
        "block_speedups": other["block_speedups"],
        "runs_per_block": other["runs_per_block"],
    }


def file_bytes(path: Path) -> int:
    """Size of a saved model, its external data file included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def write_results(out: Path, name: str, payload: dict, page: str) -> None:
    """Write `name`.json (the payload) and `name`.md (the page) into `out`, each atomically, and print the page."""
    write_json(out / f"{name}.json", payload)
    tmp_md = out / f".{name}.md.tmp"
    tmp_md.write_text(page)
    tmp_md.replace(out / f"{name}.md")
    print(page)
    print(f"wrote {out / (name + '.json')} and {name}.md in {payload['setup']['seconds_total']} s", file=sys.stderr)

