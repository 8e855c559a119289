"""What a search hands back: the trials it ran, their Pareto front, and the winner under the guarantee (inside the
budget on held-out samples and faster than the input, confirmed by timing it again), or the input unchanged."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import optuna

from onnxforge.ir import Model
from onnxforge.pipeline.acceptance import speedups_over
from onnxforge.search.evaluate import Evaluation, Evaluator
from onnxforge.search.space import Candidate, SearchSpace, candidate_of

CONFIRM_TRIES = 3  # the fastest candidates judged and timed again, in order, until one is confirmed


@dataclass
class TrialRow:
    """One finished trial: its number, state (complete: inside the budget and timed; pruned: rejected), the worker
    that ran it, the trial it repeated (`same_as`: not built again) and what it measured."""

    number: int
    state: str
    worker: str
    params: dict[str, Any]
    evaluation: Evaluation
    same_as: int | None = None

    def to_dict(self) -> dict[str, Any]:
        evaluation = self.evaluation
        return {
            "number": self.number,
            "state": self.state,
            "worker": self.worker,
            "same_as": self.same_as,
            "pipeline": evaluation.pipeline,
            "session": evaluation.session,
            "rejected": evaluation.rejected or None,
            "speedup": evaluation.speedup,
            "latency_ms": evaluation.latency_ms,
            "input_latency_ms": evaluation.input_latency_ms,
            "error": evaluation.error,
            "error_text": evaluation.error_text,
            "judged_on": evaluation.judged_on,
            "size_ratio": evaluation.size_ratio,
            "steps": evaluation.steps,
            "stepped_back": evaluation.step_back,
            "seconds": evaluation.seconds,
        }


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    """The study's finished trials that carry an evaluation, by number."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED)):
        attrs = trial.user_attrs
        if "evaluation" not in attrs:
            continue
        rows.append(TrialRow(trial.number, trial.state.name.lower(), attrs.get("worker", ""), dict(trial.params),
                             Evaluation.from_attrs(attrs["evaluation"]), attrs.get("same_as")))
    return sorted(rows, key=lambda row: row.number)


def pareto_front(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """The timed candidates no other beats on latency, error and size at once (each at least as good, one better),
    fastest first; a repeated candidate counts once."""
    timed = [row for row in rows if row.evaluation.speedup and row.same_as is None and not row.evaluation.rejected]
    points = {row.number: _objectives(row) for row in timed}

    def dominated(row: TrialRow) -> bool:
        mine = points[row.number]
        return any(
            all(a <= b for a, b in zip(theirs, mine)) and theirs != mine
            for number, theirs in points.items() if number != row.number
        )

    return sorted((row for row in timed if not dominated(row)), key=_objectives)


@dataclass
class Winner:
    """The candidate a search returns: its trial, its model (as the trial built it, or rebuilt from the trial's
    decisions where another process ran the trial), judged again on the held-out samples, and timed again against
    the input (`speedups`: both timings)."""

    row: TrialRow
    candidate: Candidate
    model: Model
    evaluation: Evaluation
    speedups: list[float]


@dataclass
class Answer:
    """The search's answer: a winner, or None with the reason; `notes` say how it was chosen."""

    winner: Winner | None
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def choose_winner(
    rows: Sequence[TrialRow],
    space: SearchSpace,
    evaluator: Evaluator,
    min_speedup: float,
    progress: Callable[[str], None] = lambda line: None,
) -> Answer:
    """The fastest candidate that stays inside the budget and at least `min_speedup` times as fast as the input
    when judged and timed again (twice, the worse timing counts); the next fastest when it does not, at
    most CONFIRM_TRIES of them. None when no trial qualifies."""
    timed = sorted((row for row in rows if row.state == "complete" and row.same_as is None), key=_objectives)
    fast = [row for row in timed if (row.evaluation.speedup or 0) >= min_speedup]
    choice = Answer(None)
    if not rows:
        choice.reason = "no trial finished (raise --time-limit or --trials)"
        return choice
    if not fast:
        best = max((row.evaluation.speedup or 0 for row in timed), default=None)
        inside = f"the fastest inside the budget measured {best:.2f}x" if best else "none stayed inside the budget"
        choice.reason = f"no candidate of {len(rows)} trials was faster than the input by {min_speedup:g}x ({inside})"
        return choice
    for row in fast[:CONFIRM_TRIES]:
        candidate = replace(candidate_of(row.params, space), step_back=row.evaluation.step_back)
        progress(f"confirming trial {row.number}: {candidate.pipeline}")
        model = evaluator.kept(candidate) or evaluator.build(candidate, row.evaluation.decisions)[0]
        prepared = evaluator.prepare(model, candidate)
        evaluation = Evaluation(candidate.pipeline, row.evaluation.session, seed=evaluator.seed)
        if not evaluator.judge(prepared, evaluation):
            choice.notes.append(f"trial {row.number} rebuilt is {evaluation.rejected}")
            continue
        speedups = speedups_over(evaluator, evaluator.input, [prepared], evaluator.feed, min_speedup, standing=False)
        timings = [round(s, 4) for s in speedups.first + speedups.again]
        if speedups.settled[0] < min_speedup:
            choice.notes.append(f"trial {row.number} timed again at {', '.join(f'{s:.2f}x' for s in timings)}: "
                                f"below {min_speedup:g}x")
            continue
        evaluation.speedup = round(speedups.settled[0], 4)
        choice.winner = Winner(row, candidate, model, evaluation, timings)
        choice.notes.append(f"trial {row.number} confirmed at {', '.join(f'{s:.2f}x' for s in timings)}")
        return choice
    choice.reason = f"none of the {min(len(fast), CONFIRM_TRIES)} fastest candidates held {min_speedup:g}x when timed again"
    return choice


def _objectives(row: TrialRow) -> tuple[float, float, float]:
    evaluation = row.evaluation
    return (evaluation.latency_ratio or float("inf"), evaluation.error or 0.0, evaluation.size_ratio or 1.0)
