"""The quant pass's region path: Conv layers in static int8 regions, chosen by timing, fitted to the budget by
leaving their last tensors float, and kept only where the whole model runs faster than with the per-type plan."""

from __future__ import annotations

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
    leave float those whose float version times faster, leave the last tensors float until `budget` holds
    (fit_float_tail), and time the result against float and against `types.build(type_plan)`: chosen when it is
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
        float_tensors, line = fit_float_tail(builder, plan, budget, calibration)
        lines += [line] if line else []
        if float_tensors == frozenset(builder.tensors(plan)):
            plan, float_tensors = {}, frozenset()
    if not plan:
        return RegionOutcome(builder, plan, chosen=False, lines=[*lines, "no region in int8: layer types decide"])
    if not timed:
        lines.append("every region in int8 (measure=false)")
        return RegionOutcome(builder, plan, chosen=True, lines=lines, float_tensors=float_tensors)

    def measure() -> Measured:
        runtime = ctx.runtime
        candidates = [runtime.prepare(builder.build(plan, float_tensors))]
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
    return RegionOutcome(builder, plan, chosen=bool(decision.value), lines=lines, float_tensors=float_tensors)


def fit_float_tail(
    builder: RegionBuilder, plan: Mapping[int, LayerFormat], budget: Budget, calibration: Calibration
) -> tuple[frozenset[str], str]:
    """The fewest of the last tensors the regions of `plan` quantize (in graph order) to leave float so that the
    held-out error (`calibration.split()`) keeps within `budget`, and a line saying how many; every one of them
    when none fits. Quantization errors grow along the depth, and the last tensors carry the outputs' precision (a
    detector's head concatenates box coordinates with scores): leaving the tail float keeps most of the int8 work.
    Found by bisection over 0, 1, 2, 4, ... tensors, which assumes that leaving more float never fits worse."""
    _, held_out = calibration.split()
    reference = run_model(builder.model, held_out, calibration)
    tensors = builder.tensors(plan)

    def tail(count: int) -> frozenset[str]:
        return frozenset(tensors[len(tensors) - count :])

    def fits(count: int) -> bool:
        outputs = run_model(builder.build(plan, tail(count)), held_out, calibration)
        return budget.fits(budget.losses(reference, outputs, held_out))

    levels = [0, *(2**power for power in range(len(tensors).bit_length()) if 2**power < len(tensors)), len(tensors)]
    count, _ = strongest_within(levels, fits)
    if count is None or count == len(tensors):
        return frozenset(tensors), f"no region fits {budget.describe()} even with its last tensors float"
    if count == 0:
        return frozenset(), ""
    first = tensors[len(tensors) - count]
    return tail(count), (
        f"the last {count} of the {len(tensors)} tensors the regions quantize (from {first} on) left float to meet "
        f"{budget.describe()}"
    )
