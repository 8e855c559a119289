"""The error budget of a run: how far the optimized model's outputs may move from the original's, measured on
samples no pass calibrated on. Parsed from --budget, shared out among the lossy passes, enforced by the pass
manager (manager.py) after each of them."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.comparison import Comparison, compare_outputs
from onnxforge.errors import PassUsageError
from onnxforge.ir import Model
from onnxforge.pipeline.score_outputs import score_outputs

Outputs = Mapping[str, np.ndarray]
Sample = Mapping[str, np.ndarray]
Losses = dict[str, float]

DEFAULT_BUDGET = "cosine=0.99,labels=0.99"

# Each bound as the loss it caps: the loss of a model against the reference, and how the bound reads.
_BOUNDS = {
    "cosine": ("1 - the worst sample's cosine similarity of any float output", ">="),
    "top1": ("1 - the top-1 agreement (argmax over the last axis) of any output that has one", ">="),
    "labels": ("the fraction of the rows of any score output (Softmax, LogSoftmax) whose top-1 label changed", ">="),
    "rel": ("the largest max|new - old| / max|old| of any output on any sample", "<="),
    "equal": ("the fraction of elements that changed in any integer or bool output", ">="),
}
_METRIC_FILE = re.compile(r"(metric\s*=\s*)(?!/)([^:,]+\.py)")  # a budget's metric file, when its path is relative
_METRIC = re.compile(r"^(?P<file>.+\.py):(?P<function>[A-Za-z_]\w*)\s*(?P<sign>>=|<=)\s*(?P<bound>.+)$")


def absolute_metric_path(text: str, base: str | Path = ".") -> str:
    """The budget `text` with its metric file's relative path made absolute, resolved from `base`."""
    return _METRIC_FILE.sub(lambda match: match[1] + str(Path(base, match[2]).resolve()), text)


class BudgetError(PassUsageError):
    """A --budget that cannot be read, or a metric function that cannot be loaded or fails: the run ends."""


@dataclass(frozen=True)
class Metric:
    """A user's task metric: `function(reference_outputs, candidate_outputs, sample) -> float`, averaged over the
    samples, and the bound its average must keep (`at_least`, or at most)."""

    name: str  # as given: "my_metrics.py:phoneme_accuracy"
    function: Callable[[Outputs, Outputs, Sample], float]
    bound: float
    at_least: bool

    def mean(self, reference: Sequence[Outputs], candidate: Sequence[Outputs], samples: Sequence[Sample]) -> float:
        """The metric's average over `samples`; BudgetError when it raises or gives no finite number."""
        values = []
        for index, (ref, cand, sample) in enumerate(zip(reference, candidate, samples)):
            try:
                value = float(self.function(dict(ref), dict(cand), dict(sample)))
            except Exception as exc:
                raise BudgetError(
                    f"--budget metric {self.name} raised {type(exc).__name__}: {exc} (on sample {index})"
                ) from None
            if not math.isfinite(value):
                raise BudgetError(f"--budget metric {self.name} gave {value} on sample {index}, not a finite number")
            values.append(value)
        return float(np.mean(values)) if values else 0.0

    def describe(self) -> str:
        return f"{self.name} {'>=' if self.at_least else '<='} {self.bound:g}"


@dataclass(frozen=True)
class Budget:
    """Bounds on the error of a model against a reference, each kept as the loss it allows (`allowances`: see
    `_BOUNDS`; "metric": how far the metric may fall from its value on the reference itself, set by `bound_to`).
    `scores`: the reference model's score outputs, which the labels bound reads (score_outputs.py); None until
    `bound_to` finds them.

    The losses of several lossy steps add up, nearly: each step's loss counts against what is left.
    """

    allowances: dict[str, float] = field(default_factory=dict)
    metric: Metric | None = None
    scores: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> Budget | None:
        """`cosine=0.99,rel=0.05,metric=my.py:accuracy>=0.98`, or `none` (no budget: None)."""
        text = text.strip()
        if text.lower() == "none":
            return None
        allowances, metric = {}, None
        for item in (part.strip() for part in text.split(",")):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not value.strip():
                raise BudgetError(f"--budget: '{item}' is not NAME=VALUE ({_usage()})")
            if key == "metric":
                metric = _load_metric(value.strip())
            elif key in _BOUNDS:
                allowances[key] = _allowance(key, value.strip())
            else:
                raise BudgetError(f"--budget: unknown bound '{key}' ({_usage()})")
        return cls(allowances, metric)

    def describe(self) -> str:
        parts = []
        for key, allowed in self.allowances.items():
            if key == "metric":
                continue
            sign = _BOUNDS[key][1]
            parts.append(f"{key}{sign}{allowed:g}" if key == "rel" else f"{key}{sign}{1 - allowed:.6g}")
        if self.metric is not None:
            parts.append(self.metric.describe())
        return ", ".join(parts)

    def bound_to(self, model: Model, reference: Sequence[Outputs], samples: Sequence[Sample]) -> Budget:
        """This budget bound to `model`, whose outputs on `samples` are `reference`: with its score outputs found
        (for the labels bound) and the metric's allowance set (how far it may fall from its value on `reference`)."""
        bound = replace(self, scores=score_outputs(model, reference)) if "labels" in self.allowances else self
        if self.metric is None:
            return bound
        own = self.metric.mean(reference, reference, samples)
        room = own - self.metric.bound if self.metric.at_least else self.metric.bound - own
        if room < 0:
            raise BudgetError(
                f"--budget metric {self.metric.describe()}: the original model itself scores {own:.6g} against its "
                "own outputs, outside the bound"
            )
        return replace(bound, allowances={**self.allowances, "metric": room})

    def losses(self, reference: Sequence[Outputs], candidate: Sequence[Outputs], samples: Sequence[Sample]) -> Losses:
        """The loss of `candidate` against `reference` (outputs on `samples`) for each bound; a bound that does not
        apply to the model's outputs (cosine without a float output, labels without a score output) reads 0."""
        comparison = compare_outputs(reference, candidate)
        if comparison.shape_mismatch:
            return dict.fromkeys(self.allowances, math.inf)
        losses = {}
        for key in self.allowances:
            if key == "cosine":
                losses[key] = 0.0 if comparison.min_cosine is None else max(0.0, 1.0 - comparison.min_cosine)
            elif key == "top1":
                top1 = comparison.min_top1_agreement
                losses[key] = 0.0 if top1 is None else 1.0 - top1
            elif key == "labels":
                losses[key] = self._labels_changed(comparison)
            elif key == "rel":
                losses[key] = comparison.max_rel
            elif key == "equal":
                losses[key] = comparison.max_mismatch_fraction or 0.0
            elif key == "metric":
                own = self.metric.mean(reference, reference, samples)
                value = self.metric.mean(reference, candidate, samples)
                losses[key] = max(0.0, own - value if self.metric.at_least else value - own)
        return losses

    def _labels_changed(self, comparison: Comparison) -> float:
        """The largest fraction of rows whose label changed, over the score outputs."""
        if self.scores is None:
            raise ValueError("the labels bound reads the score outputs bound_to finds: bind the budget to its model")
        agreements = [o.top1_agreement for o in comparison.outputs if o.name in self.scores]
        return max((1.0 - agreement for agreement in agreements if agreement is not None), default=0.0)

    def fits(self, losses: Mapping[str, float]) -> bool:
        return all(losses.get(key, 0.0) <= allowed for key, allowed in self.allowances.items())

    def spent(self, losses: Mapping[str, float]) -> float:
        """The fraction of the budget `losses` take: the largest loss over its allowance (1: all of it)."""
        fractions = [_fraction(losses.get(key, 0.0), allowed) for key, allowed in self.allowances.items()]
        return max(fractions, default=0.0)

    def remaining(self, spent: Mapping[str, float], ways: int) -> Budget:
        """What is left of this budget after `spent`, split evenly `ways` ways: one lossy pass's share."""
        left = {key: max(0.0, allowed - spent.get(key, 0.0)) / max(ways, 1) for key, allowed in self.allowances.items()}
        return replace(self, allowances=left)

    def figures(self, losses: Mapping[str, float]) -> str:
        """`losses` as the bounds read them: "worst cosine 0.9931, labels kept 0.9950, metrics.py:wer rose by 0.01"."""
        parts = []
        for key in self.allowances:
            loss = losses.get(key, 0.0)
            if key == "cosine":
                parts.append(f"worst cosine {1 - loss:.4f}")
            elif key == "top1":
                parts.append(f"top-1 agreement {1 - loss:.4f}")
            elif key == "labels":
                parts.append(f"labels kept {1 - loss:.4f}" if self.scores else "labels: no score output")
            elif key == "rel":
                parts.append(f"max rel {loss:.3g}")
            elif key == "equal":
                parts.append(f"{loss:.2%} of integer outputs changed")
            elif key == "metric":
                name = Path(self.metric.name).name  # the file's name, not where it lies
                parts.append(f"{name} {'fell' if self.metric.at_least else 'rose'} by {loss:.4g}")
        return ", ".join(parts)


@dataclass
class PassBudget:
    """The share of the run's budget that the running lossy pass may spend, measured against the model before it on
    `samples` (which no pass calibrated on): a pass that can choose how much to change (how many channels, which
    layers) keeps within it."""

    budget: Budget
    samples: list[Sample]
    where: str  # "4 held-out --data samples"

    def losses(self, reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> Losses:
        return self.budget.losses(reference, candidate, self.samples)

    def fits(self, reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> bool:
        return self.budget.fits(self.losses(reference, candidate))


class BudgetTracker:
    """The run's budget against the original model: the samples it is measured on, the original's outputs there,
    and what the model kept so far has spent (`spent`, its losses against the original)."""

    def __init__(
        self,
        budget: Budget,
        samples: Sequence[Sample],
        where: str,
        run: Callable[[Model, Sequence[Sample]], list[Outputs]],
        original: Model,
    ):
        self.samples = list(samples)
        self.where = where
        self._run = run
        self.reference = run(original, self.samples)
        self.budget = budget.bound_to(original, self.reference, self.samples)
        self.spent: Losses = dict.fromkeys(self.budget.allowances, 0.0)

    def losses(self, model: Model) -> Losses:
        """`model`'s losses against the original on the budget's samples."""
        return self.budget.losses(self.reference, self._run(model, self.samples), self.samples)

    def share(self, ways: int) -> PassBudget:
        """One lossy pass's share of what is left, when `ways` lossy passes (it included) are still to spend it."""
        return PassBudget(self.budget.remaining(self.spent, ways), self.samples, self.where)

    def verdict(self, losses: Losses) -> str:
        """One line on `losses` against the budget: the figures, and how much of the budget they take."""
        spent = self.budget.spent(losses)
        how_much = "over the budget" if spent > 1 else f"{spent:.0%} of the budget"
        return (
            f"budget {self.budget.describe()} on {self.where}: {self.budget.figures(losses)} against the original "
            f"({how_much})"
        )


def strongest_within(
    levels: Sequence[Any], fits: Callable[[Any], bool]
) -> tuple[Any | None, int]:
    """The first of `levels` (ordered strongest first) for which `fits(level)` holds, found by bisection, which
    assumes that a weaker level never fits worse; and how many levels were tried. None when none fits."""
    tried = {}

    def check(index: int) -> bool:
        if index not in tried:
            tried[index] = fits(levels[index])
        return tried[index]

    if not levels:
        return None, 0
    if check(0):
        return levels[0], 1
    if not check(len(levels) - 1):
        return None, len(tried)
    low, high = 1, len(levels) - 1  # levels[high] fits, levels[low - 1] does not
    while low < high:
        middle = (low + high) // 2
        if check(middle):
            high = middle
        else:
            low = middle + 1
    return levels[high], len(tried)


def _allowance(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if key == "rel":
        if not (math.isfinite(value) and value >= 0):
            raise BudgetError(f"--budget rel={text}: give the largest relative error allowed, 0 or more")
        return value
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise BudgetError(f"--budget {key}={text}: give the least {key} allowed, from 0 to 1")
    return 1.0 - value


def _load_metric(text: str) -> Metric:
    match = _METRIC.match(text)
    if match is None:
        raise BudgetError(f"--budget metric={text}: write metric=FILE.py:FUNCTION>=BOUND (or <=BOUND)")
    try:
        bound = float(match["bound"])
    except ValueError:
        bound = math.nan
    if not math.isfinite(bound):
        raise BudgetError(f"--budget metric={text}: the bound {match['bound']!r} is not a finite number")
    path = Path(match["file"])
    if not path.is_file():
        raise BudgetError(f"--budget metric={text}: no file {path}")
    module_name = f"onnxforge_metric_{path.stem}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        raise BudgetError(f"--budget metric={text}: cannot load {path}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, match["function"], None)
    if not callable(function):
        raise BudgetError(f"--budget metric={text}: {path} has no function {match['function']}")
    return Metric(f"{path}:{match['function']}", function, bound, match["sign"] == ">=")


def _fraction(loss: float, allowed: float) -> float:
    return 0.0 if loss <= 0 else loss / max(allowed, 1e-12)


def _usage() -> str:
    names = ", ".join(f"{key} ({meaning})" for key, (meaning, _) in _BOUNDS.items())
    return f"bounds: {names}; metric=FILE.py:FUNCTION>=BOUND; or none"
