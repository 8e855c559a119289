"""The quant pass's region path: Conv layers in static int8 regions, chosen by timing, fitted to the budget by
leaving their first or last tensors float, and kept only where the whole model runs faster than with the per-type plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.observe import run_model
from onnxforge.ir import Model
from onnxforge.ir.layers import Layer
from onnxforge.passes.quantization.activations import static_activations
from onnxforge.passes.quantization.candidates import CandidateBuilder
from onnxforge.passes.quantization.choice import choose_regions
from onnxforge.passes.quantization.regions import RegionBuilder, find_regions, region_tensors, shared_ranges
from onnxforge.passes.quantization.rewrite import LayerFormat
from onnxforge.pipeline.budget import Budget, strongest_within
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.decisions import Measured

# Regions timed one at a time in float against the rest (those with the most Conv layers): each costs two timings.
TIMED_REGIONS = 6


@dataclass
class RegionOutcome:
    """What the region path found: the regions' builder and the plan over them it kept, the per-layer plan that
    amounts to, whether it beat the per-type plan, and lines for the pass's notes."""

    builder: RegionBuilder
    plan: dict[int, LayerFormat]
    chosen: bool
    lines: list[str] = field(default_factory=list)
    float_tensors: frozenset[str] = frozenset()

    @property
    def layer_plan(self) -> dict[int, LayerFormat]:
        return self.builder.layer_plan(self.plan, self.float_tensors)

    def build(self) -> Model:
        return self.builder.build(self.plan, self.float_tensors)

    def region_of(self, index: int) -> int | None:
        """The region holding layer `index`, if any."""
        return next((r for r, region in enumerate(self.builder.regions) if index in region.convs), None)


def quantize_by_regions(
    types: CandidateBuilder,
    type_plan: Mapping[int, LayerFormat],
    convs: Mapping[int, Layer],
    conv_format: LayerFormat,
    ctx: PassContext,
    feed: Mapping[str, np.ndarray],
    budget: Budget | None,
    calibration: Calibration,
    method: str,
    percentile: float,
    min_speedup: float,
    timed: bool = True,
) -> RegionOutcome | None:
    """Put the regions around `convs` (the Conv layers static quantization may take, as `conv_format`) in int8,
    leave float those whose float version times faster, leave the first or last tensors float until `budget`
    holds (fit_float_ends), and time the result against float and against `types.build(type_plan)`: chosen when it is
    the faster and reaches `min_speedup`. Not `timed`, every region goes int8 (the budget still applies) and is
    chosen. The layers of `type_plan` other than `convs` (MatMul, Gather, Conv in subgraphs, ...) go with the
    regions. None when there is no region."""
    work = types.model
    regions = find_regions(work, convs)
    if not regions:
        return None
    names = [name for region in regions for name in region_tensors(work, region, types.layers)]
    samples, _ = calibration.split()
    activations = static_activations(
        work, list(dict.fromkeys(names)), samples, calibration, method, percentile, shared_ranges(work, regions)
    )
    others = {index: fmt for index, fmt in type_plan.items() if index not in convs}
    builder = RegionBuilder(
        work, regions, types.layers, others, types.weights, {**types.activations, **activations}, types.contrib_ops,
        types.seven_bit_weights,
    )
    lines = [f"int8 regions: {len(regions)} ({'; '.join(region.describe() for region in regions)})"]
    # Leaving a region float must gain speed, also when min_speedup < 1 accepts a slower model for its size.
    choice = choose_regions(builder, conv_format, ctx, feed, max(1.0, min_speedup), TIMED_REGIONS if timed else 0)
    if choice.replayed_from:
        lines.append(f"regions kept float as {choice.replayed_from} records, not timed: {choice.left_float or 'none'}")
    for index, speedup in choice.tried.items():
        verdict = "left float" if index in choice.left_float else "kept int8"
        lines.append(f"region {index} timed in float against the rest in int8: {speedup:.2f}x: {verdict}")
    plan = {index: conv_format for index in choice.kept}
    float_tensors: frozenset[str] = frozenset()
    if plan and budget is not None and calibration.samples:
        float_tensors, line = fit_float_ends(builder, plan, budget, calibration)
        lines += [line] if line else []
        if float_tensors == frozenset(builder.tensors(plan)):
            plan, float_tensors = {}, frozenset()
    if not plan:
        return RegionOutcome(builder, plan, chosen=False, lines=[*lines, "no region in int8: layer types decide"])
    if not timed:
        lines.append("every region in int8 (measure=false)")
        return RegionOutcome(builder, plan, chosen=True, lines=lines, float_tensors=float_tensors)

    outcome = RegionOutcome(builder, plan, chosen=False, lines=lines, float_tensors=float_tensors)
    return timed_against_layer_types(
        outcome, types, type_plan, ctx, feed, min_speedup, "the per-type plan", "int8 regions or layer types"
    )


def timed_against_layer_types(
    outcome: RegionOutcome,
    types: CandidateBuilder,
    type_plan: Mapping[int, LayerFormat],
    ctx: PassContext,
    feed: Mapping[str, np.ndarray],
    min_speedup: float,
    plan_label: str,
    decision_name: str,
) -> RegionOutcome:
    """`outcome` chosen or not by timing its regions against float and against `types.build(type_plan)` (called
    `plan_label` in its line): chosen when they are the faster and reach `min_speedup`. The run's decision
    `decision_name`."""

    def measure() -> Measured:
        runtime = ctx.runtime
        candidates = [runtime.prepare(outcome.build())]
        if type_plan:
            candidates.append(runtime.prepare(types.build(type_plan)))
        timed = runtime.time_models([runtime.prepare(types.model), *candidates], feed)[1:]
        speedups = [result.speedup for result in timed]
        by_type = speedups[1] if type_plan else 1.0
        regions_win = speedups[0] >= max(min_speedup, by_type)
        return Measured(regions_win, {"regions": round(speedups[0], 4), "layer_types": round(by_type, 4)})

    decision = ctx.decide(decision_name, measure, allowed=[True, False])
    verdict = "regions kept" if decision.value else "layer types kept"
    if decision.replayed:
        line = f"{verdict} against {plan_label}, as {decision.replayed_from} records, not timed"
    else:
        timings = decision.timings
        line = (f"int8 regions measured {timings['regions']:.2f}x against float, {plan_label} "
                f"{timings['layer_types']:.2f}x: {verdict}")
    return dataclasses.replace(outcome, chosen=bool(decision.value), lines=[*outcome.lines, line])


def fit_float_ends(
    builder: RegionBuilder, plan: Mapping[int, LayerFormat], budget: Budget, calibration: Calibration
) -> tuple[frozenset[str], str]:
    """The fewest of the first or of the last tensors the regions of `plan` quantize (in graph order) to leave
    float so that the held-out error (`calibration.split()`) keeps within `budget`, and a line saying which; every
    one of them when none fits. Quantization errors grow along the depth, and the last tensors carry the outputs'
    precision (a detector's head concatenates box coordinates with scores); the first layers see the input's raw
    range and are often the most sensitive of a CNN. Leaving one end float keeps most of the int8 work. Each end
    is found by bisection over 0, 1, 2, 4, ... tensors, which assumes that leaving more float never fits worse;
    on a tie the last tensors are left float."""
    _, held_out = calibration.split()
    reference = run_model(builder.model, held_out, calibration)
    tensors = builder.tensors(plan)
    verdicts: dict[frozenset[str], bool] = {}

    def fits(floated: frozenset[str]) -> bool:
        if floated not in verdicts:
            outputs = run_model(builder.build(plan, floated), held_out, calibration)
            verdicts[floated] = budget.fits(budget.losses(reference, outputs, held_out))
        return verdicts[floated]

    ends = {
        "last": lambda count: frozenset(tensors[len(tensors) - count :]),
        "first": lambda count: frozenset(tensors[:count]),
    }
    levels = [0, *(2**power for power in range(len(tensors).bit_length()) if 2**power < len(tensors)), len(tensors)]
    found: list[tuple[int, str]] = []
    for end, take in ends.items():
        count, _ = strongest_within(levels, lambda count, take=take: fits(take(count)))
        if count == 0:
            return frozenset(), ""
        if count is not None and count < len(tensors):
            found.append((count, end))
    if not found:
        return frozenset(tensors), f"no region fits {budget.describe()} even with its first or last tensors float"
    count, end = min(found, key=lambda item: item[0])
    where = f"from {tensors[len(tensors) - count]} on" if end == "last" else f"up to {tensors[count - 1]}"
    return ends[end](count), (
        f"the {end} {count} of the {len(tensors)} tensors the regions quantize ({where}) left float to meet "
        f"{budget.describe()}"
    )
