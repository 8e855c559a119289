"""Time onnxruntime sessions in one process, in interleaved blocks, and report their speed ratios.

Shared by the benchmarks: sessions are timed in rounds of one block each (A, B, A, B, ... or A, B, C, A, B, C,
...), every block the same number of runs, and a speedup is the median over rounds of the ratio of block
medians, which cancels slow drift of the machine. Create the sessions with thread spinning off
(`BackendOptions(allow_spinning=False)`): a spinning pool steals the cores of the session timed after it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxforge.measure import InterleavedTiming as Timing
from onnxforge.measure import interleaved_latency
from onnxforge.report import environment, write_json


def interleaved_timing(sessions: Sequence, feed: dict, timing: Timing) -> list[dict]:
    """Time onnxruntime sessions in interleaved blocks; the first is the baseline the others' speedups are relative to.

    Returns one dict per session: `stats` (latency over all its runs) and, for all but the first, `speedup`
    (median over rounds of baseline block median / this block median; above 1 is faster), `speedup_iqr`,
    `speedup_of_pooled_medians` and `block_speedups`.
    """
    runs = [lambda session=session: session.run(None, feed) for session in sessions]
    timed = interleaved_latency(runs, timing)
    results = []
    for index, model in enumerate(timed):
        result = {"stats": model.stats.to_dict(), "runs_per_block": model.runs_per_block}
        if index > 0:
            result.update(
                speedup=model.speedup,
                speedup_iqr=[round(q, 4) for q in model.speedup_iqr],
                speedup_of_pooled_medians=timed[0].stats.median_ms / model.stats.median_ms,
                block_speedups=list(model.block_speedups),
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


@dataclass
class BenchmarkRun:
    """One run of a benchmark: when it started and how loaded the machine was; writes its results."""

    started: float = field(default_factory=time.perf_counter)
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])

    def write(
        self,
        out: Path,
        name: str,
        quick: bool,
        fields: dict,
        results: list[dict],
        markdown: Callable[[list[dict], dict, dict], str],
    ) -> None:
        """Write `name`.json and `name`.md (`name`-quick.* for a quick run) into `out`, each atomically, and
        print the page; the setup holds `fields` with the date, the run's length and the load average."""
        setup = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "quick": quick,
            **fields,
            "seconds_total": round(time.perf_counter() - self.started, 1),
            # Other processes on the machine share its cores; a high load average makes every figure less certain.
            "load_average_1min": {"start": round(self.load_before, 2), "end": round(os.getloadavg()[0], 2)},
        }
        env = environment()
        name = f"{name}-quick" if quick else name
        write_json(out / f"{name}.json", {"setup": setup, "environment": env, "results": results})
        page = markdown(results, setup, env)
        tmp_md = out / f".{name}.md.tmp"
        tmp_md.write_text(page)
        tmp_md.replace(out / f"{name}.md")
        print(page)
        print(f"wrote {out / (name + '.json')} and {name}.md in {setup['seconds_total']} s", file=sys.stderr)

