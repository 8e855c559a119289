"""Measured choice: quantize a layer type only in a format that the target runs faster than float."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxforge.passes.base import PassContext
from onnxforge.passes.quantization.candidates import CandidateBuilder, Plan
from onnxforge.passes.quantization.rewrite import LayerFormat


@dataclass
class TypeMeasurement:
    """What timing said of one layer type: each candidate format's speedup over float, and the one kept."""

    op: str
    members: list[int]
    speedups: list[tuple[LayerFormat, float]] = field(default_factory=list)
    chosen: LayerFormat | None = None

    @property
    def layers(self) -> int:
        return len(self.members)

    @property
    def best_speedup(self) -> float | None:
        return max((s for _, s in self.speedups), default=None)


@dataclass
class MeasuredChoice:
    """The plan measurement left, what it measured per layer type, and the whole plan's speedup."""

    plan: dict[int, LayerFormat]
    by_type: dict[str, TypeMeasurement]
    speedup: float | None = None
    dropped_after_combining: list[str] = field(default_factory=list)


def choose_by_measurement(
    builder: CandidateBuilder,
    plan: Plan,
    candidates: Mapping[str, Sequence[LayerFormat]],
    ctx: PassContext,
    feed: Mapping[str, np.ndarray],
    min_speedup: float,
    thresholds: Mapping[str, float] | None = None,
) -> MeasuredChoice:
    """Time, per layer type, the model with only that type quantized in each candidate format against float.

    A type keeps the fastest candidate if it reaches `min_speedup` (or its own entry in `thresholds`); one
    that falls short is timed again and keeps its better result, so one disturbed timing cannot turn it down
    (the final check of the whole model still guards against a slower result); then
    the types kept are timed together, and while the whole is slower than float (or than `min_speedup`, when
    below 1: a size-first choice) the type that gained least goes back to float.
    """
    thresholds = thresholds or {}
    baseline = ctx.prepare(builder.model)
    ops = {index: builder.layers[index].op for index in plan}
    by_type: dict[str, TypeMeasurement] = {}
    for op in sorted(set(ops.values())):
        members = [index for index in plan if ops[index] == op]
        formats = list(candidates.get(op, ())) or [plan[members[0]]]
        measurement = TypeMeasurement(op, members)
        prepared = [ctx.prepare(builder.build({i: fmt for i in members})) for fmt in formats]
        needed = thresholds.get(op, min_speedup)
        speedups = [result.speedup for result in ctx.time_models([baseline, *prepared], feed)[1:]]
        if max(speedups) < needed:  # a type is turned down only when a second timing agrees
            again = [result.speedup for result in ctx.time_models([baseline, *prepared], feed)[1:]]
            speedups = [max(first, second) for first, second in zip(speedups, again)]
        measurement.speedups = list(zip(formats, speedups))
        best_format, best = max(measurement.speedups, key=lambda pair: pair[1])
        if best >= needed:
            measurement.chosen = best_format
        by_type[op] = measurement
    chosen = {op: m for op, m in by_type.items() if m.chosen is not None}
    result = MeasuredChoice({}, by_type)
    while chosen:
        combined = {i: chosen[ops[i]].chosen for i in plan if ops[i] in chosen}
        if len(chosen) == 1:
            result.plan, result.speedup = combined, next(iter(chosen.values())).best_speedup
            break
        speedup = ctx.time_models([baseline, ctx.prepare(builder.build(combined))], feed)[1].speedup
        if speedup >= min(1.0, min_speedup):
            result.plan, result.speedup = combined, speedup
            break
        weakest = min(chosen, key=lambda op: chosen[op].best_speedup)
        chosen.pop(weakest)
        by_type[weakest].chosen = None
        result.dropped_after_combining.append(weakest)
    return result


@dataclass
class PrefixRefinement:
    """What timing float prefixes changed: the plan, how many of the first layers went back to float, and the
    speedup that measured against the plan before; `tried` maps each prefix length timed to its speedup."""

    plan: dict[int, LayerFormat]
    kept_float: list[int] = field(default_factory=list)
    speedup: float = 1.0
    tried: dict[int, float] = field(default_factory=dict)


def refine_by_float_prefix(
    builder: CandidateBuilder, plan: Plan, ctx: PassContext, feed: Mapping[str, np.ndarray], min_gain: float
) -> PrefixRefinement:
    """Leave the first layers in float where int8 starting later runs faster: the first 1, 2, 4, ... layers
    (fewer than half) are timed in float against the plan, and the fastest prefix that gains `min_gain` in
    two timings is kept.

    Early layers see the largest activations with the fewest channels: quantizing the input and running
    int8 there can cost more than it saves, which timing one layer type as a whole does not show.
    """
    order = sorted(plan)
    prepared = ctx.prepare(builder.build(plan))
    result = PrefixRefinement(dict(plan))
    count = 1
    while count <= len(order) // 2:
        trial = ctx.prepare(builder.build({i: plan[i] for i in order[count:]}))
        result.tried[count] = ctx.time_models([prepared, trial], feed)[1].speedup
        count *= 2
    best = max(result.tried, key=result.tried.get, default=None)
    if best is None or result.tried[best] < min_gain:
        return result
    trial = ctx.prepare(builder.build({i: plan[i] for i in order[best:]}))
    again = ctx.time_models([prepared, trial], feed)[1].speedup
    if again >= min_gain:
        result.plan = {i: plan[i] for i in order[best:]}
        result.kept_float = order[:best]
        result.speedup = min(again, result.tried[best])
    return result
