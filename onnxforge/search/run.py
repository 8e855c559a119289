"""`optimize --auto` and `onnxforge search-worker`: find the fastest model inside the budget by measuring candidates
on the target, in one process or in several that share a study's storage."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onnxforge.data import load_samples
from onnxforge.frontends import ModelFile
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import InterleavedTiming
from onnxforge.pipeline.budget import DEFAULT_BUDGET, Budget, absolute_metric_path
from onnxforge.pipeline.tunables import SearchTarget
from onnxforge.report import environment
from onnxforge.search.evaluate import Evaluation, Evaluator
from onnxforge.search.outcome import Answer, TrialRow, choose_winner, pareto_front, trial_rows
from onnxforge.search.space import SearchSpace, SessionSettings
from onnxforge.search.study import (
    SearchError,
    SearchSetup,
    create_study,
    digest,
    join_study,
    open_storage,
    run_trials,
    sampler,
    setup_of,
    worker_name,
)

MIN_SPEEDUP = 1.02  # what "faster than the input" means: timing noise on a loaded machine is about 1-2%


@dataclass
class SearchResult:
    """What a search found: the model to ship (the winner's, or the input unchanged), whether it is an
    improvement, the pipeline as a config that rebuilds it without searching, the session settings to deploy with,
    and the search's report."""

    model: Model
    improved: bool
    message: str
    report: dict[str, Any]
    config: dict[str, Any] | None = None
    session: dict[str, Any] | None = None
    explanations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The lines a person reads after the search."""
        report = self.report
        counts = report["counts"]
        lines = [
            f"  search: {counts['trials']} trials ({counts['timed']} timed, {counts['rejected']} rejected, "
            f"{counts['repeated']} repeated) in {report['seconds']:.0f} s, study '{report['study']}'",
            f"  {self.message}",
        ]
        if self.improved:
            winner = report["winner"]
            lines.append(f"  passes: {winner['pipeline']}")
            lines.append(f"  session: {winner['session']}")
        return "\n".join(lines)

    def explanation(self) -> str:
        """Why the winner won: the Pareto front, what was rejected and why, and how the winner was confirmed."""
        report = self.report
        lines = ["Pareto front (latency, error, size against the input):"]
        for row in report["pareto_front"]:
            lines.append(f"  trial {row['number']}: {row['speedup']:.2f}x, {row['error_text']}, size "
                         f"{row['size_ratio']:.2f}x  {row['pipeline']}")
        rejected: dict[str, int] = {}
        for row in report["trials"]:
            if row["rejected"]:
                reason = row["rejected"].split(":")[0]
                rejected[reason] = rejected.get(reason, 0) + 1
        for reason, count in rejected.items():
            lines.append(f"rejected ({count}): {reason}")
        lines.extend(self.explanations)
        lines.append(self.message)
        return "\n".join(lines)


def search(
    model: str | os.PathLike | ModelFile,
    *,
    data: str | os.PathLike | None = None,
    budget: str = DEFAULT_BUDGET,
    passes: str | Sequence[str] | None = None,
    backend: str = "ort",
    target: str = "cpu",
    shapes: Mapping[str, Sequence[int]] | None = None,
    backend_settings: Mapping[str, str] | None = None,
    trials: int = 50,
    time_limit: float | None = None,
    storage: str | None = None,
    study: str | None = None,
    sampler_name: str = "auto",
    seed: int = 0,
    min_speedup: float = MIN_SPEEDUP,
    timing: InterleavedTiming | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> SearchResult:
    """Search pipelines of `passes` (default: space.DEFAULT_PASSES) and session settings for the fastest model of
    `model` inside `budget` on the held-out samples of `data`, timing each candidate against the input on
    `backend`/`target`; stop after `trials` finished trials in the study or `time_limit` seconds.

    storage: where the study lives ("sqlite:///FILE", a SQLite file path, "postgresql://..."; None: in memory)
    and `study` its name (default: from the model and the options), so that a search resumes there and
    `search_worker` processes join it. The winner is judged and timed again; it must be at least
    `min_speedup` times as fast as the input, else the input comes back unchanged (`improved` False). `timing`:
    how candidates are timed against the input, and how their passes time their measured choices
    (measure.InterleavedTiming's defaults).
    """
    started = time.monotonic()
    model_file = model if isinstance(model, ModelFile) else ModelFile.load(model)
    budget_text = absolute_metric_path(budget)
    setup = SearchSetup(
        model=str(Path(model_file.path).resolve()),
        model_sha256=digest(model_file.path),
        budget=budget_text,
        backend=backend,
        target=target,
        passes=_pass_list(passes),
        data=str(Path(data).resolve()) if data is not None else None,
        data_sha256=digest(data),
        shapes={name: list(dims) for name, dims in (shapes or {}).items()},
        backend_settings=dict(backend_settings or {}),
        seed=seed,
        sampler=sampler_name,
        trials=trials,
        cores=os.cpu_count() or 1,
    )
    space, evaluator = _prepare(setup, model_file, timing=timing)
    name = study or default_study_name(setup)
    opened = create_study(open_storage(storage), name, setup, space)
    progress(f"search: study '{name}', {space.size():g} candidates, up to {trials} trials"
             + (f" or {time_limit:g} s" if time_limit else ""))
    run_trials(opened, setup, space, evaluator, time_limit, _trial_progress(progress))
    rows = trial_rows(opened)
    answer = choose_winner(rows, space, evaluator, min_speedup, progress)
    return _result(model_file, setup, space, name, rows, answer, min_speedup, time.monotonic() - started)


def search_worker(
    storage: str,
    study: str,
    *,
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    time_limit: float | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> int:
    """Join the search `study` in `storage` and run its trials until it holds all it asked for or `time_limit`
    seconds pass; the model and data are read where the study says (or at `model`/`data`), and must be the same
    files (SearchError if not). Returns how many trials this worker finished."""
    opened = join_study(open_storage(storage), study)
    setup = setup_of(opened)
    model_path = Path(model) if model is not None else Path(setup.model)
    data_path = Path(data) if data is not None else (Path(setup.data) if setup.data else None)
    if not model_path.is_file():
        raise SearchError(f"the search's model {model_path} is not here: give its copy with --model")
    if digest(model_path) != setup.model_sha256:
        raise SearchError(f"{model_path} is not the model of search '{study}' (its SHA-256 differs)")
    if setup.data_sha256 is not None and (data_path is None or digest(data_path) != setup.data_sha256):
        raise SearchError(f"the search's --data {data_path} is missing or differs here: give its copy with --data")
    space, evaluator = _prepare(setup, ModelFile.load(model_path), data_path)
    opened.sampler = sampler(setup, space, worker=1 + os.getpid() % 997)
    before = _finished_by(opened, worker_name())
    progress(f"search-worker: joined study '{study}' ({setup.trials} trials in all)")
    run_trials(opened, setup, space, evaluator, time_limit, _trial_progress(progress))
    return _finished_by(opened, worker_name()) - before


def default_study_name(setup: SearchSetup) -> str:
    """A name that is the same for the same search (model, data, budget, passes, target, seed, sampler): a rerun
    resumes it, other options start another study."""
    keys = {key: value for key, value in asdict(setup).items() if key not in ("model", "data", "trials", "cores")}
    return f"{Path(setup.model).stem}-{hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]}"


def _prepare(
    setup: SearchSetup, model_file: ModelFile, data: Path | None = None, timing: InterleavedTiming | None = None
) -> tuple[SearchSpace, Evaluator]:
    data_path = data if data is not None else setup.data
    samples = load_samples(Path(data_path), skeleton_proto(model_file.model)) if data_path else None
    budget = Budget.parse(setup.budget)
    where = SearchTarget(setup.backend, setup.target, has_data=samples is not None)
    space = SearchSpace.build(model_file.model, where, setup.passes, cores=setup.cores)
    evaluator = Evaluator(
        model_file, samples, budget, setup.backend, setup.target, setup.backend_settings, setup.shapes, setup.seed,
        timing,
    )
    return space, evaluator


def _pass_list(passes: str | Sequence[str] | None) -> list[str] | None:
    if passes is None:
        return None
    return [passes] if isinstance(passes, str) else list(passes)


def _trial_progress(progress: Callable[[str], None]) -> Callable[[int, Evaluation], None]:
    def report(number: int, evaluation: Evaluation) -> None:
        if evaluation.rejected:
            outcome = f"rejected: {evaluation.rejected}"
        else:
            outcome = f"{evaluation.speedup:.2f}x, {evaluation.error_text}"
        session = ", ".join(f"{key}={value}" for key, value in evaluation.session.items()
                            if value != getattr(SessionSettings(), key))
        settings = f" [{session}]" if session else ""
        progress(f"[trial {number}] {evaluation.pipeline or '(no pass)'}{settings} ... {outcome} "
                 f"({evaluation.seconds:.1f} s)")

    return report


def _result(
    model_file: ModelFile,
    setup: SearchSetup,
    space: SearchSpace,
    name: str,
    rows: list[TrialRow],
    answer: Answer,
    min_speedup: float,
    seconds: float,
) -> SearchResult:
    winner = answer.winner
    report: dict[str, Any] = {
        "study": name,
        "setup": asdict(setup),
        "space": space.describe(),
        "min_speedup": min_speedup,
        "seconds": round(seconds, 1),
        "counts": {
            "trials": len(rows),
            "timed": sum(row.evaluation.speedup is not None for row in rows),
            "rejected": sum(bool(row.evaluation.rejected) for row in rows),
            "repeated": sum(row.same_as is not None for row in rows),
        },
        "trials": [row.to_dict() for row in rows],
        "pareto_front": [row.to_dict() for row in pareto_front(rows)],
        "winner": None,
        "environment": environment(),
    }
    if winner is None:
        message = f"kept the input unchanged: {answer.reason}"
        report["message"] = message
        return SearchResult(model_file.model, False, message, report, explanations=answer.notes)
    evaluation = winner.evaluation
    report["winner"] = {
        "trial": winner.row.number,
        "pipeline": winner.candidate.pipeline,
        "session": asdict(winner.candidate.session),
        "speedups": winner.speedups,
        "error_text": evaluation.error_text,
        "judged_on": evaluation.judged_on,
        "size_ratio": winner.row.evaluation.size_ratio,
    }
    message = (f"best: {evaluation.speedup:.2f}x faster than the input (timed again: "
               f"{', '.join(f'{s:.2f}x' for s in winner.speedups)}), {evaluation.error_text} on {evaluation.judged_on}")
    report["message"] = message
    # A winner without passes is the input with other session settings: no config rebuilds it, none is needed.
    config = None if not winner.candidate.passes else {
        "passes": list(winner.candidate.passes),
        "budget": setup.budget,
        "seed": setup.seed,
        "backend": setup.backend,
        "target": setup.target,
        **({"data": setup.data} if setup.data else {}),
        **({"shapes": setup.shapes} if setup.shapes else {}),
        **({"threads": winner.candidate.session.threads} if winner.candidate.session.threads else {}),
        "decisions": {"values": winner.row.evaluation.decisions},
    }
    session = winner.candidate.session.for_onnxruntime() if setup.backend == "ort" else None
    return SearchResult(winner.model, True, message, report, config, session, answer.notes)


def _finished_by(study: Any, worker: str) -> int:
    return sum(row.worker == worker for row in trial_rows(study))
