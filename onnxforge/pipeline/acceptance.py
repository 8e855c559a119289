"""What a lossy pass's result must reach to be kept (speed, size), declared by the pass and judged by the pass
manager against the model before the pass; and the timing rule every measured choice shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from onnxforge.backends.base import Prepared
from onnxforge.ir import Model
from onnxforge.measure import RelativeLatency
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.decisions import Measured

KEPT = "whole model kept"  # the key of the timing decision, after the pass's position and description


@dataclass(frozen=True)
class Speedups:
    """Each candidate's speedup over the baseline: the `first` timing, `again` when a second one was taken
    (else empty), and `settled`, the two read in favour of the default (see `speedups_over`)."""

    first: list[float]
    again: list[float]
    settled: list[float]


class TimesModels(Protocol):
    """What times prepared models against each other: the run's Runtime, or a search's evaluator."""

    def time_models(self, prepared: Sequence[Prepared], inputs: Mapping[str, np.ndarray]) -> list[RelativeLatency]:
        ...


def speedups_over(
    runtime: TimesModels,
    baseline: Prepared,
    candidates: Sequence[Prepared],
    feed: Mapping[str, np.ndarray],
    needed: float,
    standing: bool = True,
) -> Speedups:
    """Time `candidates` against `baseline` in one interleaved run on `feed`; when that timing would overturn the
    default, time them all once more, so that a moment's load on the machine never decides alone.

    standing=True: the candidates stand unless too slow (a pass's result, a layer type's format); no candidate
    reaching `needed` is timed again, and each one settles at the better of its two speedups.
    standing=False: a candidate must earn its place (a refinement of a plan); the best reaching `needed` is
    timed again, and each one settles at the worse of its two speedups.
    """
    if not candidates:
        return Speedups([], [], [])
    prepared = [baseline, *candidates]
    first = [result.speedup for result in runtime.time_models(prepared, feed)[1:]]
    if (max(first) >= needed) == standing:  # the default stands: one timing is enough
        return Speedups(first, [], first)
    again = [result.speedup for result in runtime.time_models(prepared, feed)[1:]]
    settle = max if standing else min
    return Speedups(first, again, [settle(pair) for pair in zip(first, again)])


@dataclass
class Verdict:
    """Whether a pass's result is kept, and the notes and counters that say why, for its record."""

    kept: bool
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Acceptance:
    """What a lossy pass's result must reach for the pass manager to keep it (a bound left None is not checked);
    a result that falls short is stepped back to the model before the pass. A pass declares it in `acceptance`.

    `baseline` names the model before the pass in notes, `too_slow` is the note of a result stepped back for
    speed (by default it names min_speedup), and the counters in `zeroed` describe the change: a result
    stepped back reads 0 there.
    """

    min_speedup: float | None = None  # speedup over the model before, timed on the run's backend and target
    max_size_ratio: float | None = None  # weight bytes after the pass / before it
    baseline: str = "the model before the pass"
    too_slow: str = ""
    zeroed: tuple[str, ...] = ()

    def judge(self, before: Model, after: Model, ctx: PassContext) -> Verdict:
        """Whether `after`, the pass's result, is kept rather than `before`: the size bound first, then timing
        (interleaved on `ctx.runtime.feed`, timed again when below min_speedup: kept if either timing reaches it), a
        decision of `ctx` that a replay takes from its record without timing."""
        verdict = Verdict(True)
        if self.max_size_ratio is not None:
            self._judge_size(before, after, verdict)
        if verdict.kept and self.min_speedup is not None:
            self._judge_speed(before, after, ctx, verdict)
        if not verdict.kept:
            verdict.stats.update(dict.fromkeys(self.zeroed, 0))
        return verdict

    def _judge_size(self, before: Model, after: Model, verdict: Verdict) -> None:
        old, new = before.stats().bytes, after.stats().bytes
        ratio = verdict.stats["size_ratio"] = round(new / max(old, 1), 4)
        verdict.notes.append(f"weights {old} -> {new} bytes ({ratio:.2f}x of {self.baseline})")
        if ratio > self.max_size_ratio:
            verdict.kept = False
            verdict.notes.append(f"above max_size_ratio={self.max_size_ratio:g}: the model is left as it was")

    def _judge_speed(self, before: Model, after: Model, ctx: PassContext, verdict: Verdict) -> None:
        needed = self.min_speedup

        def measure() -> Measured:
            runtime = ctx.runtime
            baseline, candidate = runtime.prepare(before), runtime.prepare(after)
            speedups = speedups_over(runtime, baseline, [candidate], runtime.feed(before), needed)
            timings = [round(s, 4) for s in speedups.first + speedups.again]
            return Measured(speedups.settled[0] >= needed, {"speedups": timings})

        decision = ctx.decide(KEPT, measure, allowed=[True, False])
        if decision.replayed:
            said = "kept" if decision.value else "stepped back"
            verdict.notes.append(f"whole model {said} as {decision.replayed_from} records, not timed")
            verdict.stats["decisions_replayed"] = ctx.replayed_decisions()
        else:
            first, *again = decision.timings["speedups"]
            where = f"against {self.baseline} on {ctx.runtime.backend}/{ctx.runtime.target}"
            verdict.notes.append(f"whole model measured {first:.2f}x {where}")
            verdict.notes.extend(f"timed again: {speedup:.2f}x" for speedup in again)
            verdict.stats["measured_speedup"] = max(decision.timings["speedups"])
        if not decision.value:
            verdict.kept = False
            verdict.notes.append(self.too_slow or f"below min_speedup={needed:g}: the model is left as it was")
