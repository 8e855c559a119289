"""Per-layer sensitivity, and leaving the most sensitive layers in float until the model is within its error budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.observe import run_model
from onnxforge.comparison import Comparison, compare_outputs
from onnxforge.passes.quantization.candidates import CandidateBuilder, Plan
from onnxforge.passes.quantization.rewrite import LayerFormat


@dataclass(frozen=True)
class ErrorBudget:
    """How far the quantized model may be from float: the worst relative error and/or the worst cosine.

    Errors are those of `onnxforge.comparison.compare_outputs`, the worst over outputs and samples.
    """

    max_error: float | None = None
    min_cosine: float | None = None

    @property
    def given(self) -> bool:
        return self.max_error is not None or self.min_cosine is not None

    def met(self, comparison: Comparison) -> bool:
        if self.max_error is not None and comparison.max_rel > self.max_error:
            return False
        cosine = comparison.min_cosine
        return self.min_cosine is None or (cosine is not None and cosine >= self.min_cosine)

    def score(self, comparison: Comparison) -> float:
        """One number to rank layers by (larger: more harmful): the budget's own metric."""
        if self.min_cosine is not None and comparison.min_cosine is not None:
            return 1.0 - comparison.min_cosine
        return comparison.max_rel


@dataclass
class BudgetFit:
    """The plan within budget, each layer's sensitivity, the layers moved to a gentler format or left in float
    for it, and the final error on the held-out samples."""

    plan: dict[int, LayerFormat]
    sensitivity: dict[int, float] = field(default_factory=dict)
    gentler: list[int] = field(default_factory=list)
    kept_float: list[int] = field(default_factory=list)
    error: Comparison | None = None


def fit_error_budget(
    builder: CandidateBuilder,
    plan: Plan,
    budget: ErrorBudget,
    calibration: Calibration,
    gentler: Mapping[int, LayerFormat] | None = None,
) -> BudgetFit:
    """Move the most sensitive layers of `plan` to a gentler format, or else to float, as few as the budget
    allows on the held-out samples (`calibration.split()`).

    A layer's sensitivity is the error of the model with only that layer quantized, on the calibration
    samples. `gentler` gives layers a format that loses less (and gains less speed); when moving every layer
    that has one there cannot meet the budget, the most sensitive layers are left in float instead. How many
    layers move is found by bisection, which assumes that moving more of the most sensitive layers never
    makes the error worse.
    """
    gentler = gentler or {}
    calibration_samples, held_out = calibration.split()
    reference_held_out = run_model(builder.model, held_out, calibration)

    def error_on_held_out(candidate: Plan) -> Comparison:
        return compare_outputs(reference_held_out, run_model(builder.build(candidate), held_out, calibration))

    full = error_on_held_out(plan)
    if budget.met(full):
        return BudgetFit(dict(plan), error=full)
    reference = run_model(builder.model, calibration_samples, calibration)
    sensitivity = {
        index: budget.score(
            compare_outputs(reference, run_model(builder.build({index: fmt}), calibration_samples, calibration))
        )
        for index, fmt in plan.items()
    }
    order = sorted(plan, key=lambda index: sensitivity[index], reverse=True)

    def softened(count: int) -> dict[int, LayerFormat]:
        moved = {i: gentler[i] for i in order[:count] if i in gentler}
        return {i: moved.get(i, plan[i]) for i in order if i in moved or i not in order[:count]}

    def floated(count: int) -> dict[int, LayerFormat]:
        return {i: plan[i] for i in order[count:]}

    for make in (softened, floated) if gentler else (floated,):
        count, error = _fewest_moved(lambda k: error_on_held_out(make(k)), len(order), budget)
        if count is not None:
            moved = order[:count]
            if make is softened:
                return BudgetFit(
                    make(count),
                    sensitivity,
                    gentler=[i for i in moved if i in gentler],
                    kept_float=[i for i in moved if i not in gentler],
                    error=error,
                )
            return BudgetFit(make(count), sensitivity, kept_float=moved, error=error)
    return BudgetFit({}, sensitivity, kept_float=order, error=compare_outputs(reference_held_out, reference_held_out))


def _fewest_moved(error_of: Callable[[int], Comparison], total: int, budget: ErrorBudget) -> tuple:
    """The fewest of `total` layers to move for `error_of(count)` to meet the budget, and that error;
    (None, None) when moving all of them does not meet it either."""
    errors = {total: error_of(total)}
    if not budget.met(errors[total]):
        return None, None
    low, high = 1, total
    while low < high:
        middle = (low + high) // 2
        errors[middle] = error_of(middle)
        if budget.met(errors[middle]):
            high = middle
        else:
            low = middle + 1
    if low not in errors:
        errors[low] = error_of(low)
    if not budget.met(errors[low]):  # the error did not shrink steadily: moving all is what is sure to meet it
        low = total
    return low, errors[low]
