"""A search as an Optuna study: what every worker needs to join it (kept in the study), its storage (SQLite, or
PostgreSQL for workers on several machines), its sampler, and the trial loop a worker runs."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from onnxforge.errors import OnnxforgeError
from onnxforge.limits import TimeLimitError
from onnxforge.search.evaluate import Evaluation, Evaluator
from onnxforge.search.space import SearchSpace

SETUP_ATTR = "onnxforge.search"
STARTING_POINT = "starting_point"  # the user attribute of a queued starting point's trial
SAMPLERS = ("auto", "tpe", "nsga2", "grid", "random")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_S = 10  # a worker's trial without a heartbeat for GRACE_S is failed and run again by another
GRACE_S = 60


class SearchError(OnnxforgeError):
    """A search cannot start or join: its storage cannot be opened, or its study is another search's."""


@dataclass
class SearchSetup:
    """What a search is, kept in its study so that a worker on another machine runs the same trials: the input
    and data (paths and digests), the budget, the passes it may use, the backend and target, the seed, the sampler
    and how many trials in all."""

    model: str
    model_sha256: str
    budget: str
    backend: str = "ort"
    target: str = "cpu"
    passes: list[str] | None = None
    data: str | None = None
    data_sha256: str | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    backend_settings: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    sampler: str = "auto"
    trials: int = 50
    cores: int = 1  # of the machine that started the search: the thread counts the space offers

    @property
    def pareto(self) -> bool:
        """Whether the study minimizes latency, error and size together (NSGA-II) rather than latency alone."""
        return self.sampler == "nsga2"

    def same_search(self, other: SearchSetup) -> list[str]:
        """The fields in which `other` is another search (empty: the same one)."""
        keys = ("model_sha256", "budget", "backend", "target", "passes", "data_sha256", "shapes", "seed", "sampler")
        return [key for key in keys if getattr(self, key) != getattr(other, key)]


def digest(path: str | os.PathLike | None) -> str | None:
    """The SHA-256 of a file, or of a folder's files by name and contents (None for None)."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    hasher = hashlib.sha256()
    for file in files:
        hasher.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """Optuna storage at `url`: "sqlite:///FILE", "postgresql://USER@HOST/DB" (psycopg), a path (a SQLite file),
    or None (in memory: nothing to resume, no other worker). Trials of a worker that stops without a word (killed,
    its machine lost) are failed after a minute and run again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours to print
    if url is None:
        return optuna.storages.InMemoryStorage()
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # SQLAlchemy's default driver is psycopg2's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except Exception as exc:  # SQLAlchemy's and the drivers' errors share no base class of ours
            message = " ".join(str(exc).split("(Background on this error")[0].split())[:300]
            raise SearchError(f"cannot open the search storage {_without_password(url)}: {message}") from None


def create_study(
    storage: optuna.storages.BaseStorage, name: str, setup: SearchSetup, space: SearchSpace
) -> optuna.Study:
    """The study `name` in `storage`, with the setup's sampler: resumed when it exists (SearchError if it is
    another search), else created with the space's starting points queued first."""
    if name in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}:
        study = join_study(storage, name, setup)
    else:
        directions = ["minimize"] * (3 if setup.pareto else 1)
        study = optuna.create_study(storage=storage, study_name=name, directions=directions)
        study.set_user_attr(SETUP_ATTR, asdict(setup))
        # The starting points first: a grid that runs out of time has tried them, not whatever it drew. A grid
        # hardly larger than they are is tried whole anyway (and Optuna's GridSampler fails when a queued trial
        # ends with one grid point left).
        points = space.starting_points()
        if _resolved_sampler(setup, space) != "grid" or space.size() > len(points) + 1:
            complete = {name: values[0] for name, values in space.grid().items()}  # a grid point names them all
            for params in points:
                study.enqueue_trial({**complete, **params}, {STARTING_POINT: True}, skip_if_exists=True)
    study.sampler = sampler(setup, space)
    return study


def join_study(storage: optuna.storages.BaseStorage, name: str, expected: SearchSetup | None = None) -> optuna.Study:
    """The existing study `name` (give it a sampler of its setup before running trials); SearchError when there is
    none or when it was made for another search than `expected`."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SearchError(f"no search study '{name}' in the storage (start it with optimize --auto --study)") from None
    setup = setup_of(study)
    if expected is not None and (differs := setup.same_search(expected)):
        raise SearchError(
            f"study '{name}' holds another search (its {', '.join(differs)} differ): give another --study, or "
            "the same options to resume it"
        )
    return study


def setup_of(study: optuna.Study) -> SearchSetup:
    """The setup a study was made with; SearchError for a study no onnxforge search made."""
    attrs = study.user_attrs.get(SETUP_ATTR)
    if not isinstance(attrs, dict):
        raise SearchError(f"study '{study.study_name}' was not made by optimize --auto")
    return SearchSetup(**attrs)


def sampler(setup: SearchSetup, space: SearchSpace, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The setup's sampler, seeded by its seed and the worker's number (so that workers do not propose alike)."""
    seed = setup.seed + 7919 * worker
    kind = _resolved_sampler(setup, space)
    if kind == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, setup.trials // 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        startup = max(3, min(10, setup.trials // 4))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True)


def _resolved_sampler(setup: SearchSetup, space: SearchSpace) -> str:
    """auto: every candidate when there are no more than the trials (a grid), else TPE."""
    if setup.sampler != "auto":
        return setup.sampler
    return "grid" if space.size() <= setup.trials else "tpe"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_trials(
    study: optuna.Study,
    setup: SearchSetup,
    space: SearchSpace,
    evaluator: Evaluator,
    seconds: float | None,
    progress: Callable[[int, Evaluation], None] = lambda number, evaluation: None,
) -> None:
    """Run trials of `study` until it holds `setup.trials` finished ones or `seconds` pass. A candidate already
    judged (by any worker) is not built again; a candidate outside the budget or failing is pruned with its
    reason, so that only candidates inside the budget complete."""
    grid = _resolved_sampler(setup, space) == "grid"
    me = worker_name()

    def objective(trial: optuna.Trial) -> float | tuple[float, float, float]:
        candidate = space.suggest(trial, conditional=not grid)
        # The starting points are built as optimize builds them; the sampler's candidates at their own settings.
        candidate = replace(candidate, step_back=bool(trial.user_attrs.get(STARTING_POINT)))
        trial.set_user_attr("candidate", candidate.key)
        trial.set_user_attr("worker", me)
        judged = _judged(study, candidate.key)
        if judged is not None:
            evaluation = Evaluation.from_attrs(judged.user_attrs["evaluation"])
            trial.set_user_attr("same_as", judged.number)
        else:
            evaluation = _evaluate(evaluator, candidate)
        trial.set_user_attr("evaluation", evaluation.to_attrs())
        progress(trial.number, evaluation)
        if evaluation.rejected or evaluation.speedup is None:
            raise optuna.TrialPruned(evaluation.rejected)
        if setup.pareto:
            return evaluation.latency_ratio, evaluation.error or 0.0, evaluation.size_ratio or 1.0
        return evaluation.latency_ratio

    if _finished(study) >= setup.trials:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(
            objective,
            timeout=seconds,
            callbacks=[optuna.study.MaxTrialsCallback(setup.trials, states=FINISHED)],
            gc_after_trial=True,
        )


def _evaluate(evaluator: Evaluator, candidate: Any) -> Evaluation:
    """The candidate judged; a candidate onnxforge cannot build or run is rejected with the reason (a deadline of
    the whole run still ends it)."""
    started = time.monotonic()
    try:
        return evaluator.evaluate(candidate)
    except TimeLimitError as exc:
        if exc.deadline is not None:
            raise
        failure = exc
    except OnnxforgeError as exc:
        failure = exc
    return Evaluation(
        candidate.pipeline, asdict(candidate.session), rejected=f"failed: {failure}",
        seconds=round(time.monotonic() - started, 3), seed=evaluator.seed,
    )


def _judged(study: optuna.Study, key: str) -> optuna.trial.FrozenTrial | None:
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        if trial.user_attrs.get("candidate") == key and "evaluation" in trial.user_attrs:
            return trial
    return None


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _without_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}://{credentials.split(':')[0]}{at}{host}" if at else url
