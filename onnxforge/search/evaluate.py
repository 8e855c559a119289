"""One candidate of a search, built and judged against the input: its error on held-out samples (a few first, so
that a candidate outside the budget is never timed), then its latency timed against the input's, interleaved."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxforge.api import for_backend, optimize
from onnxforge.backends import get_backend
from onnxforge.backends.base import BackendOptions, Prepared
from onnxforge.calibration.context import split_samples
from onnxforge.comparison import compare_outputs
from onnxforge.feeds import Feeds
from onnxforge.frontends import ModelFile
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import InterleavedTiming, RelativeLatency, interleaved_device_latency, interleaved_latency
from onnxforge.pipeline import Pass
from onnxforge.pipeline.budget import Budget
from onnxforge.pipeline.manager import Instrument, PassRecord
from onnxforge.report import OptimizationReport
from onnxforge.search.space import Candidate

Sample = dict[str, np.ndarray]
EARLY_SAMPLES = 4  # held-out samples a candidate is judged on first; outside the budget there, it is not timed
RANDOM_SAMPLES = 8  # without --data: random inputs that judge the error
KEPT_MODELS = 3  # the fastest candidates' models kept, so that the winner is confirmed without building it again
KEPT_MODEL_BYTES = 1 << 30  # a model larger than this is built again instead


@dataclass
class Evaluation:
    """What a search learnt of one candidate. `rejected` says why it cannot be the answer (outside the budget,
    failed); else `speedup` is its latency against the input's, timed interleaved (above 1: faster)."""

    pipeline: str
    session: dict[str, Any]
    rejected: str = ""
    error: float | None = None  # the fraction of the budget spent (1: all), else 1 - the worst cosine or max rel
    error_text: str = ""  # the error as the budget's bounds read it
    judged_on: str = ""
    speedup: float | None = None
    latency_ms: float | None = None
    input_latency_ms: float | None = None
    size_ratio: float | None = None  # weight bytes against the input's
    steps: list[str] = field(default_factory=list)  # each pass of the run and what became of it
    decisions: dict[str, Any] = field(default_factory=dict)  # the run's measured decisions, to rebuild it
    seed: int = 0
    seconds: float = 0.0
    step_back: bool = False  # built as a plain optimize run builds it: see Candidate.step_back

    @property
    def latency_ratio(self) -> float | None:
        return None if not self.speedup else 1.0 / self.speedup

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Evaluation:
        return cls(**{key: value for key, value in attrs.items() if key in cls.__dataclass_fields__})


class Evaluator:
    """Builds candidates of one input with `optimize` (the same data, budget, backend and seed for each) and judges
    them against the input on the samples calibration held out (random inputs without data)."""

    def __init__(
        self,
        model_file: ModelFile,
        samples: Sequence[Sample] | None,
        budget: Budget | None,
        backend: str = "ort",
        target: str = "cpu",
        backend_settings: Mapping[str, str] | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        timing: InterleavedTiming | None = None,
    ):
        self.model_file = model_file
        self.samples = list(samples) if samples else None
        self.budget = budget
        self.backend, self.target = backend, target
        self.backend_settings = dict(backend_settings or {})
        self.shapes = {name: list(dims) for name, dims in (shapes or {}).items()}
        self.seed = seed
        self.timing = timing or InterleavedTiming()
        self._runtime = get_backend(backend)
        # On a backend that compiles static shapes only, the input is compiled with them fixed, as optimize does.
        static = {**({k: list(np.shape(v)) for k, v in self.samples[0].items()} if self.samples else {}), **self.shapes}
        fixed = for_backend(model_file.model, backend, static)
        source = str(model_file.path) if fixed is model_file.model else fixed
        self.input = self._runtime.prepare(source, BackendOptions(target=target, extra=self.backend_settings))
        self.judging, self.judged_on = self._judging_samples()
        self.reference = [self.input.run(sample) for sample in self.judging]
        self.bound = budget.bound_to(fixed, self.reference, self.judging) if budget is not None else None
        self.feed = self.judging[0] if self.samples is None else self.samples[0]
        self._kept: dict[str, tuple[float, Model]] = {}  # candidate.model_key -> (speedup, model) of the fastest

    def build(
        self, candidate: Candidate, decisions: Mapping[str, Any] | None = None
    ) -> tuple[Model, OptimizationReport | None]:
        """The model of `candidate`: measured decisions made now, or replayed from `decisions` (an Evaluation's),
        which gives the same model byte for byte. A candidate without passes is the input itself (no report).
        A lossy pass outside its share of the budget at the candidate's settings stops the build with
        OutsideItsShare, unless the candidate steps back: then the run goes on as optimize's does, without it."""
        if not candidate.passes:
            return self.model_file.model, None
        record = None if decisions is None else {"decisions": {"values": dict(decisions)}}
        return optimize(
            self.model_file,
            list(candidate.passes),
            data=self.samples,
            budget=self.budget,
            shapes=self.shapes or None,
            seed=self.seed,
            backend=self.backend,
            target=self.target,
            threads=candidate.session.threads,
            timing=self.timing,
            backend_settings=self.backend_settings,
            decisions=record,
            step_back=candidate.step_back,
            instruments=[] if candidate.step_back else [_StopOutsideShare()],
        )

    def kept(self, candidate: Candidate) -> Model | None:
        """The model of `candidate` as its trial built it here, if it is among the fastest this evaluator timed."""
        kept = self._kept.get(candidate.model_key)
        return kept[1] if kept else None

    def evaluate(self, candidate: Candidate) -> Evaluation:
        """Build `candidate`, judge its error (a few samples first), and time it against the input if in budget."""
        started = time.monotonic()
        evaluation = Evaluation(candidate.pipeline, asdict(candidate.session), seed=self.seed,
                                step_back=candidate.step_back)
        try:
            model, report = self.build(candidate)
        except OutsideItsShare as outside:
            evaluation.rejected = f"a pass outside its share of the budget: {outside}"
            evaluation.seconds = round(time.monotonic() - started, 3)
            return evaluation
        evaluation.size_ratio = 1.0
        if report is not None:
            evaluation.steps = [f"{record.name}: {record.status}" for record in report.passes]
            evaluation.decisions = report.decisions.get("values", {})
            evaluation.size_ratio = round(report.after.bytes / max(report.before.bytes, 1), 4)
        prepared = self.prepare(model, candidate)
        if self.judge(prepared, evaluation):
            self.time(prepared, evaluation)
            self._keep(candidate, model, evaluation)
        evaluation.seconds = round(time.monotonic() - started, 3)
        return evaluation

    def judge(self, prepared: Prepared, evaluation: Evaluation) -> bool:
        """Set `evaluation`'s error on the judging samples, the first few alone first; False when it is outside
        the budget (then `rejected` says so)."""
        early = min(EARLY_SAMPLES, len(self.judging))
        outputs = [prepared.run(sample) for sample in self.judging[:early]]
        if not self._within(outputs, evaluation, f"{early} of {self.judged_on}"):
            return False
        outputs += [prepared.run(sample) for sample in self.judging[early:]]
        return self._within(outputs, evaluation, self.judged_on)

    def time(self, prepared: Prepared, evaluation: Evaluation) -> None:
        """Time the candidate against the input on the search's feed; set its speedup and latencies."""
        baseline, candidate = self.time_models([self.input, prepared], self.feed)
        evaluation.speedup = round(candidate.speedup, 4)
        evaluation.latency_ms = round(candidate.stats.median_ms, 4)
        evaluation.input_latency_ms = round(baseline.stats.median_ms, 4)

    def time_models(self, prepared: Sequence[Prepared], inputs: Mapping[str, np.ndarray]) -> list[RelativeLatency]:
        """Time prepared models against the first in interleaved blocks on `inputs`: onnxruntime from here, another
        backend on its device (a remote board's included) with its own timer."""
        feed = dict(inputs)
        if self.backend == "ort":
            return interleaved_latency([lambda p=p: p.run(feed) for p in prepared], self.timing)
        return interleaved_device_latency([lambda options, p=p: p.measure(feed, options) for p in prepared], self.timing)

    def prepare(self, model: Model, candidate: Candidate) -> Prepared:
        """`model` loaded on the search's backend with `candidate`'s session settings."""
        return self._runtime.prepare(model, candidate.session.backend_options(self.target, self.backend_settings))

    def _keep(self, candidate: Candidate, model: Model, evaluation: Evaluation) -> None:
        """Keep `model` if it is among the KEPT_MODELS fastest timed here (and not too large to hold)."""
        if not candidate.passes or model.stats().bytes > KEPT_MODEL_BYTES:
            return
        self._kept[candidate.model_key] = (evaluation.speedup or 0.0, model)
        fastest = sorted(self._kept.items(), key=lambda item: -item[1][0])[:KEPT_MODELS]
        self._kept = dict(fastest)

    def _within(self, outputs: list[dict[str, np.ndarray]], evaluation: Evaluation, where: str) -> bool:
        reference, judging = self.reference[: len(outputs)], self.judging[: len(outputs)]
        evaluation.judged_on = where
        if self.bound is None:
            comparison = compare_outputs(reference, outputs)
            cosine = comparison.min_cosine
            evaluation.error = round(1 - cosine if cosine is not None else comparison.max_rel, 8)
            evaluation.error_text = f"worst cosine {cosine:.6f}" if cosine is not None else f"max rel {evaluation.error:.3g}"
            return True
        losses = self.bound.losses(reference, outputs, judging)
        evaluation.error = round(self.bound.spent(losses), 6)
        evaluation.error_text = self.bound.figures(losses)
        if not self.bound.fits(losses):
            evaluation.rejected = f"outside the budget on {where}: {evaluation.error_text}"
            return False
        return True

    def _judging_samples(self) -> tuple[list[Sample], str]:
        """The samples every candidate is judged on: those calibration holds out of --data (its one split), else
        random inputs of the run's seed."""
        if self.samples is not None:
            held_out = split_samples(self.samples)[1]
            return held_out, f"{len(held_out)} held-out --data samples"
        feeds = Feeds(shapes=self.shapes)
        proto = skeleton_proto(self.model_file.model)
        feeds.resolve(proto, self.input.run, self.seed)
        return feeds.inputs(proto, RANDOM_SAMPLES, self.seed), f"{RANDOM_SAMPLES} random inputs"


class OutsideItsShare(Exception):
    """A lossy pass of a candidate kept outside its share of the budget at the settings the candidate gave it."""


class _StopOutsideShare(Instrument):
    """Ends a candidate's build at the first lossy pass that the budget stepped back: the rest would build a
    model the search tries as a candidate of its own (the same passes without that one)."""

    def __init__(self) -> None:
        self._lossy = False

    def before_pass(self, index: int, total: int, pass_: Pass, model: Model) -> None:
        self._lossy = not pass_.lossless

    def after_pass(self, index: int, total: int, record: PassRecord) -> None:
        if self._lossy and record.over_budget:
            raise OutsideItsShare(f"{record.name}: {record.budget}")
