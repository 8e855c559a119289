"""Measured choice: quantize a layer type only in a format that the target runs faster than float."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxforge.comparison import compare_outputs
from onnxforge.ir import Model
from onnxforge.pipeline.acceptance import speedups_over
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.decisions import Measured
from onnxforge.passes.quantization.attention_int8 import qattention_sites, to_qattention
from onnxforge.passes.quantization.candidates import CandidateBuilder, Plan
from onnxforge.passes.quantization.regions import RegionBuilder
from onnxforge.passes.quantization.rewrite import LayerFormat

FLOAT = "float"  # the decision of a layer type that no format made faster
# QAttention quantizes and multiplies as the operators it replaces: their outputs differ by float rounding only.
_SAME_ATTENTION = 1e-4


@dataclass
class TypeMeasurement:
    """What timing said of one layer type: each candidate format's speedup over float, and the one kept.

    Replayed (`replayed_from` names the record), the kept format comes from the record and nothing is timed.
    """

    op: str
    members: list[int]
    speedups: list[tuple[LayerFormat, float]] = field(default_factory=list)
    chosen: LayerFormat | None = None
    replayed_from: str = ""

    @property
    def layers(self) -> int:
        return len(self.members)

    @property
    def best_speedup(self) -> float | None:
        return max((s for _, s in self.speedups), default=None)


@dataclass
class MeasuredChoice:
    """The plan measurement left, what it measured per layer type, and the whole plan's speedup (None when
    replayed)."""

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
    that falls short is timed again and keeps its better result (`speedups_over`), so one disturbed timing cannot
    turn it down (the pass's acceptance, judged on the whole model, still guards against a slower result); then
    the types kept are timed together, and while the whole is slower than float (or than `min_speedup`, when
    below 1: a size-first choice) the type that gained least goes back to float.
    Each of these choices is a decision of `ctx` (the format's name, or "float"; the type sent back to float,
    or None): replayed from an earlier run's record, none of them is timed.
    """
    thresholds = thresholds or {}
    baseline = functools.cache(lambda: ctx.runtime.prepare(builder.model))
    contrib_ops = builder.contrib_ops
    ops = {index: builder.layers[index].op for index in plan}
    by_type: dict[str, TypeMeasurement] = {}
    for op in sorted(set(ops.values())):
        members = [index for index in plan if ops[index] == op]
        formats = {fmt.describe(contrib_ops): fmt for fmt in list(candidates.get(op, ())) or [plan[members[0]]]}
        needed = thresholds.get(op, min_speedup)

        def measure(members: list[int] = members, formats: dict = formats, needed: float = needed) -> Measured:
            prepared = [ctx.runtime.prepare(builder.build({i: fmt for i in members})) for fmt in formats.values()]
            speedups = speedups_over(ctx.runtime, baseline(), prepared, feed, needed).settled
            best_name, best = max(zip(formats, speedups), key=lambda pair: pair[1])
            timings = {"speedups": {name: round(s, 4) for name, s in zip(formats, speedups)}}
            return Measured(best_name if best >= needed else FLOAT, timings)

        decision = ctx.decide(f"{op} layers", measure, allowed=[*formats, FLOAT])
        measurement = TypeMeasurement(op, members, replayed_from=decision.replayed_from)
        if not decision.replayed:
            measurement.speedups = [(formats[name], s) for name, s in decision.timings["speedups"].items()]
        measurement.chosen = formats.get(decision.value)
        by_type[op] = measurement
    chosen = {op: m for op, m in by_type.items() if m.chosen is not None}
    result = MeasuredChoice({}, by_type)
    while chosen:
        combined = {i: chosen[ops[i]].chosen for i in plan if ops[i] in chosen}
        if len(chosen) == 1:
            result.plan, result.speedup = combined, next(iter(chosen.values())).best_speedup
            break

        def measure_together(combined: dict = combined, chosen: dict = chosen) -> Measured:
            candidate = ctx.runtime.prepare(builder.build(combined))
            speedup = ctx.runtime.time_models([baseline(), candidate], feed)[1].speedup
            weakest = min(chosen, key=lambda op: chosen[op].best_speedup)
            return Measured(None if speedup >= min(1.0, min_speedup) else weakest, {"speedup": round(speedup, 4)})

        decision = ctx.decide(f"back to float of {'+'.join(chosen)} together", measure_together, [None, *chosen])
        if decision.value is None:
            result.plan, result.speedup = combined, decision.timings.get("speedup")
            break
        chosen.pop(decision.value)
        by_type[decision.value].chosen = None
        result.dropped_after_combining.append(decision.value)
    return result


@dataclass
class PrefixRefinement:
    """What timing float prefixes changed: the plan, how many of the first layers went back to float, and the
    worse of the two speedups that measured against the plan before; `tried` maps each prefix length timed to its
    first speedup, `again` to its second when they were timed again (both empty, and `speedup` None, when replayed
    from `replayed_from`)."""

    plan: dict[int, LayerFormat]
    kept_float: list[int] = field(default_factory=list)
    speedup: float | None = 1.0
    tried: dict[int, float] = field(default_factory=dict)
    again: dict[int, float] = field(default_factory=dict)
    replayed_from: str = ""


def refine_by_float_prefix(
    builder: CandidateBuilder, plan: Plan, ctx: PassContext, feed: Mapping[str, np.ndarray], min_gain: float
) -> PrefixRefinement:
    """Leave the first layers in float where int8 starting later runs faster: the plans with the first 1, 2, 4,
    ... layers (fewer than half) in float are timed together against the plan, again when the fastest gains
    `min_gain` (`speedups_over`, where a change must earn its place), and the fastest prefix that gains it in
    both timings is kept. How many is a decision of `ctx` (0: none), replayed without timing when recorded.

    Early layers see the largest activations with the fewest channels: quantizing the input and running
    int8 there can cost more than it saves, which timing one layer type as a whole does not show.
    """
    order = sorted(plan)
    counts = [2**power for power in range(len(order)) if 2**power <= len(order) // 2]

    def measure() -> Measured:
        if not counts:
            return Measured(0, {"tried": {}})
        runtime = ctx.runtime
        trials = [runtime.prepare(builder.build({i: plan[i] for i in order[count:]})) for count in counts]
        speedups = speedups_over(runtime, runtime.prepare(builder.build(plan)), trials, feed, min_gain, standing=False)
        settled = dict(zip(counts, speedups.settled))
        best = max(settled, key=settled.get)
        timings = {"tried": dict(zip(counts, speedups.first)), "again": dict(zip(counts, speedups.again))}
        return Measured(best if settled[best] >= min_gain else 0, timings)

    decision = ctx.decide("first layers kept float", measure, allowed=[0, *counts])
    tried, again = decision.timings.get("tried", {}), decision.timings.get("again", {})
    result = PrefixRefinement(dict(plan), tried=tried, again=again, replayed_from=decision.replayed_from)
    if decision.value:
        result.plan = {i: plan[i] for i in order[decision.value :]}
        result.kept_float = order[: decision.value]
        result.speedup = None if decision.replayed else min(again[decision.value], tried[decision.value])
    return result


@dataclass
class RegionChoice:
    """The regions timing kept in int8, and what it measured: for each region timed in float against the rest, the
    speedup leaving it float gave (`left_float` those it kept float); empty when replayed from `replayed_from`."""

    kept: list[int]
    tried: dict[int, float] = field(default_factory=dict)
    left_float: list[int] = field(default_factory=list)
    replayed_from: str = ""


def choose_regions(
    builder: RegionBuilder,
    conv_format: LayerFormat,
    ctx: PassContext,
    feed: Mapping[str, np.ndarray],
    min_gain: float,
    at_most: int,
) -> RegionChoice:
    """Start from every region in int8 (its Conv layers as `conv_format`) and time, for each of the `at_most` regions with the most Conv layers, the
    model with that region back in float against the current choice: a region whose float version runs faster by
    `min_gain` in two timings (`speedups_over`, where a change must earn its place) stays float.

    A region's int8 kernels pay off together, which timing layer types one at a time cannot show; leaving one
    region out at a time finds the islands (a head of few channels, a chain through float-only ops) where the
    quantization around them costs more than they save. Each region's verdict is a decision of `ctx`.
    """
    kept = list(range(len(builder.regions)))
    result = RegionChoice(kept)
    if len(kept) < 2 or at_most == 0:
        return result
    largest = sorted(kept, key=lambda index: -len(builder.regions[index].convs))[:at_most]
    prepared: dict[tuple[int, ...], Any] = {}  # the current choice's model, built once while it stands
    for index in sorted(largest):
        region = builder.regions[index]
        current = list(kept)

        def measure(current: list[int] = current, index: int = index) -> Measured:
            runtime = ctx.runtime
            if tuple(current) not in prepared:
                prepared.clear()
                prepared[tuple(current)] = runtime.prepare(builder.build({i: conv_format for i in current}))
            without = {i: conv_format for i in current if i != index}
            return _earns_its_place(ctx, prepared[tuple(current)], runtime.prepare(builder.build(without)), feed,
                                    min_gain)

        decision = ctx.decide(f"region {index} ({region.describe()}) in float", measure, allowed=[True, False])
        result.replayed_from = result.replayed_from or decision.replayed_from
        if not decision.replayed:
            result.tried[index] = decision.timings["speedup"]
        if decision.value:
            kept.remove(index)
            result.left_float.append(index)
    return result


@dataclass
class GentlerVerdict:
    """Whether the gentler formats ran faster than float for the layers that take them (`speedup`, None when
    replayed or not asked)."""

    pays: bool | None = None
    speedup: float | None = None
    replayed_from: str = ""


def gentler_verdict(
    builder: CandidateBuilder,
    plan: Plan,
    ctx: PassContext,
    feed: Mapping[str, np.ndarray],
    min_gain: float,
    verdict: GentlerVerdict,
):
    """A `gentler_pays` for `fit_error_budget`: time `plan` with every layer that has a gentler format in it
    against the same plan with those layers in float; the gentler formats pay when they run faster by `min_gain`
    in two timings (`speedups_over`, where a change must earn its place). A decision of `ctx`, kept in `verdict`.
    """

    def pays(gentler: Mapping[int, LayerFormat]) -> bool:
        def measure() -> Measured:
            runtime = ctx.runtime
            floated = runtime.prepare(builder.build({i: f for i, f in plan.items() if i not in gentler}))
            softened = runtime.prepare(builder.build({i: gentler.get(i, f) for i, f in plan.items()}))
            return _earns_its_place(ctx, floated, softened, feed, min_gain)

        decision = ctx.decide("gentler formats instead of float", measure, allowed=[True, False])
        verdict.pays, verdict.replayed_from = decision.value, decision.replayed_from
        verdict.speedup = decision.timings.get("speedup")
        return decision.value

    return pays


def choose_attention_form(
    model: Model, ctx: PassContext, feed: Mapping[str, np.ndarray], min_gain: float
) -> tuple[Model, str | None]:
    """`model`, or a copy with its int8 attention projections as onnxruntime's QAttention (`to_qattention`) when
    that runs faster by `min_gain` in two timings and computes the same outputs on `feed`; and a line that says
    which, None when the model has no such projection. A decision of `ctx`."""
    if not qattention_sites(model):
        return model, None
    fused = model.copy()
    count = to_qattention(fused)

    def measure() -> Measured:
        runtime = ctx.runtime
        prepared = [runtime.prepare(model), runtime.prepare(fused)]
        outputs = [p.run(feed) for p in prepared]
        if not compare_outputs([outputs[0]], [outputs[1]]).within(_SAME_ATTENTION):
            return Measured(False, {"same_outputs": False})
        return _earns_its_place(ctx, prepared[0], prepared[1], feed, min_gain)

    decision = ctx.decide("attention projections as QAttention", measure, allowed=[True, False])
    blocks = f"{count} attention block{'s' if count > 1 else ''}"
    what = f"{blocks} as QAttention (one int8 operator for projection and attention)"
    if decision.replayed:
        timed = f"as recorded in {decision.replayed_from}"
    elif "speedup" in decision.timings:
        timed = f"timed {decision.timings['speedup']:.2f}x against DynamicQuantizeMatMul, Split and MultiHeadAttention"
    else:
        timed = "its outputs differ"
    return (fused if decision.value else model), f"{what}: {timed}: {'taken' if decision.value else 'not taken'}"


def _earns_its_place(
    ctx: PassContext, standing: Any, change: Any, feed: Mapping[str, np.ndarray], min_gain: float
) -> Measured:
    """Whether the prepared model `change` runs faster than `standing` by `min_gain` in two timings
    (`speedups_over`, where a change must earn its place), with the speedup it settled at."""
    speedups = speedups_over(ctx.runtime, standing, [change], feed, min_gain, standing=False)
    return Measured(speedups.settled[0] >= min_gain, {"speedup": round(speedups.settled[0], 4)})
