"""The quant pass's region path: Conv layers in static int8 regions, chosen by timing, fitted to the budget, and
kept only where the whole model runs faster than with the per-layer-type plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from onnxforge.calibration.context import Calibration
from onnxforge.ir.layers import Layer
from onnxforge.passes.quantization.activations import static_activations
from onnxforge.passes.quantization.candidates import CandidateBuilder
from onnxforge.passes.quantization.choice import choose_regions
from onnxforge.passes.quantization.regions import RegionBuilder, find_regions, region_tensors, shared_ranges
from onnxforge.passes.quantization.rewrite import LayerFormat
from onnxforge.passes.quantization.sensitivity import fit_error_budget
from onnxforge.pipeline.budget import Budget
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

    @property
    def layer_plan(self) -> dict[int, LayerFormat]:
        return self.builder.layer_plan(self.plan)

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
    """Put the regions around `convs` (the Conv layers static quantization may take, as `conv_format`) in int8, leave float those
    whose float version times faster, move the most sensitive back to float until `budget` holds, and time the
    result against float and against `types.build(type_plan)`: chosen when it is the faster and reaches
    `min_speedup`. Not `timed`, every region goes int8 (the budget still applies) and is chosen. The layers of
    `type_plan` other than `convs` (MatMul, Gather, Conv in subgraphs, ...) go with the regions. None when there is no region."""
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
        work, regions, types.layers, others, types.weights, {**types.activations, **activations}, types.contrib_ops
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
    if plan and budget is not None and calibration.samples:
        fit = fit_error_budget(builder, plan, budget, calibration)
        if fit.kept_float:
            left = ", ".join(str(index) for index in fit.kept_float)
            lines.append(f"regions {left} left float to meet {budget.describe()} (the most sensitive)")
        plan = fit.plan
    if not plan:
        return RegionOutcome(builder, plan, chosen=False, lines=[*lines, "no region in int8: layer types decide"])
    if not timed:
        return RegionOutcome(builder, plan, chosen=True, lines=[*lines, "every region in int8 (measure=false)"])

    def measure() -> Measured:
        runtime = ctx.runtime
        candidates = [runtime.prepare(builder.build(plan))]
        if type_plan:
            candidates.append(runtime.prepare(types.build(type_plan)))
        speedups = [result.speedup for result in runtime.time_models([runtime.prepare(work), *candidates], feed)[1:]]
        by_type = speedups[1] if type_plan else 1.0
        regions_win = speedups[0] >= max(min_speedup, by_type)
        return Measured(regions_win, {"regions": round(speedups[0], 4), "layer_types": round(by_type, 4)})

    decision = ctx.decide("int8 regions or layer types", measure, allowed=[True, False])
    verdict = "regions kept" if decision.value else "layer types kept"
    if decision.replayed:
        lines.append(f"{verdict}, as {decision.replayed_from} records, not timed")
    else:
        timings = decision.timings
        lines.append(
            f"int8 regions measured {timings['regions']:.2f}x against float, the per-type plan "
            f"{timings['layer_types']:.2f}x: {verdict}"
        )
    return RegionOutcome(builder, plan, chosen=bool(decision.value), lines=lines)
