"""Per-layer sensitivity, and leaving the most sensitive layers in float until the model is within its error budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.observe import run_model
from onnxforge.passes.quantization.candidates import CandidateBuilder, Plan
from onnxforge.passes.quantization.rewrite import LayerFormat
from onnxforge.pipeline.budget import Budget, Losses, strongest_within

# Calibration samples that rank the layers: each layer costs a run of the model on each of them.
RANKING_SAMPLES = 16


@dataclass
class BudgetFit:
    """The plan within budget, each layer's sensitivity (the share of the budget it spends quantized alone), and
    the layers moved to a gentler format or left in float for it."""

    plan: dict[int, LayerFormat]
    sensitivity: dict[int, float] = field(default_factory=dict)
    gentler: list[int] = field(default_factory=list)
    kept_float: list[int] = field(default_factory=list)


def fit_error_budget(
    builder: CandidateBuilder,
    plan: Plan,
    budget: Budget,
    calibration: Calibration,
    gentler: Mapping[int, LayerFormat] | None = None,
    gentler_pays: Callable[[Mapping[int, LayerFormat]], bool] | None = None,
) -> BudgetFit:
    """Move the most sensitive layers of `plan` to a gentler format, or else to float, as few as the budget
    allows on the held-out samples (`calibration.split()`).

    A layer's sensitivity is the error of the model with only that layer quantized, on the first
    RANKING_SAMPLES calibration samples (it only orders the layers; the budget is checked on every held-out one). `gentler` gives layers a format that loses less (and gains less speed); when moving every layer
    that has one there cannot meet the budget, the most sensitive layers are left in float instead. How many
    layers move is found by bisection, which assumes that moving more of the most sensitive layers never
    makes the error worse. `gentler_pays`, asked once and only when the plan breaks the budget, may turn the
    gentler formats down (when the target runs them slower than float, say).
    """
    gentler = gentler or {}
    calibration_samples, held_out = calibration.split()
    reference_held_out = run_model(builder.model, held_out, calibration)

    def fits_on_held_out(candidate: Plan) -> bool:
        outputs = run_model(builder.build(candidate), held_out, calibration)
        return budget.fits(budget.losses(reference_held_out, outputs, held_out))

    if fits_on_held_out(plan):
        return BudgetFit(dict(plan))
    if gentler and gentler_pays is not None and not gentler_pays(gentler):
        gentler = {}
    ranking = calibration_samples[:RANKING_SAMPLES]
    reference = run_model(builder.model, ranking, calibration)

    def alone(index: int) -> Losses:
        outputs = run_model(builder.build({index: plan[index]}), ranking, calibration)
        return budget.losses(reference, outputs, ranking)

    sensitivity = {index: budget.spent(alone(index)) for index in plan}
    order = sorted(plan, key=lambda index: sensitivity[index], reverse=True)

    def softened(count: int) -> dict[int, LayerFormat]:
        moved = {i: gentler[i] for i in order[:count] if i in gentler}
        return {i: moved.get(i, plan[i]) for i in order if i in moved or i not in order[:count]}

    def floated(count: int) -> dict[int, LayerFormat]:
        return {i: plan[i] for i in order[count:]}

    for make in (softened, floated) if gentler else (floated,):
        count, _ = strongest_within(range(1, len(order) + 1), lambda k: fits_on_held_out(make(k)))
        if count is not None:
            moved = order[:count]
            if make is softened:
                return BudgetFit(
                    make(count),
                    sensitivity,
                    gentler=[i for i in moved if i in gentler],
                    kept_float=[i for i in moved if i not in gentler],
                )
            return BudgetFit(make(count), sensitivity, kept_float=moved)
    return BudgetFit({}, sensitivity, kept_float=order)

