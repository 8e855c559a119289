"""Per-layer sensitivity, and leaving the most sensitive layers in float until the model is within its error budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from onnxforge.passes.base import PassContext
from onnxforge.passes.quantization.activations import Sample, run_model
from onnxforge.passes.quantization.candidates import CandidateBuilder, Plan
from onnxforge.passes.quantization.rewrite import LayerFormat
from onnxforge.verify import Comparison, compare_outputs


@dataclass(frozen=True)
class ErrorBudget:
    """How far the quantized model may be from float: the worst relative error and/or the worst cosine.

    Errors are those of `onnxforge.verify.compare_outputs`, the worst over outputs and samples.
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
    """The plan within budget, each layer's sensitivity, the layers left in float for it, and the final error."""

    plan: dict[int, LayerFormat]
    sensitivity: dict[int, float] = field(default_factory=dict)
    kept_float: list[int] = field(default_factory=list)
    error: Comparison | None = None


def fit_error_budget(
    builder: CandidateBuilder,
    plan: Plan,
    budget: ErrorBudget,
    ctx: PassContext,
    calibration: Sequence[Sample],
    held_out: Sequence[Sample],
) -> BudgetFit:
    """Keep the most sensitive layers of `plan` in float, as few as the budget allows on the held-out samples.

    A layer's sensitivity is the error of the model with only that layer quantized, on the calibration
    samples. The number of layers left in float is found by bisection, which assumes that leaving more
    of the most sensitive layers in float never makes the error worse.
    """
    reference_held_out = run_model(builder.model, held_out, ctx)

    def error_on_held_out(candidate: Plan) -> Comparison:
        return compare_outputs(reference_held_out, run_model(builder.build(candidate), held_out, ctx))

    full = error_on_held_out(plan)
    if budget.met(full):
        return BudgetFit(dict(plan), error=full)
    reference = run_model(builder.model, calibration, ctx)
    sensitivity = {
        index: budget.score(compare_outputs(reference, run_model(builder.build({index: fmt}), calibration, ctx)))
        for index, fmt in plan.items()
    }
    order = sorted(plan, key=lambda index: sensitivity[index], reverse=True)
    low, high = 1, len(order)  # the fewest layers left in float that meet the budget lies in [low, high]
    errors = {len(order): compare_outputs(reference_held_out, reference_held_out)}
    while low < high:
        middle = (low + high) // 2
        errors[middle] = error_on_held_out({i: plan[i] for i in order[middle:]})
        if budget.met(errors[middle]):
            high = middle
        else:
            low = middle + 1
    if low not in errors:
        errors[low] = error_on_held_out({i: plan[i] for i in order[low:]})
    if not budget.met(errors[low]):  # the error did not shrink steadily: only all-float is sure to meet it
        low = len(order)
    return BudgetFit(
        {i: plan[i] for i in order[low:]}, sensitivity=sensitivity, kept_float=order[:low], error=errors[low]
    )

