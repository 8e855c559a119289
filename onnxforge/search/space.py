"""The search space of `optimize --auto`: the passes a search may use with each one's tunable options on the model,
and the runtime's session settings; an Optuna trial's suggestions made into a candidate (a pipeline and settings)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from onnxforge.backends.base import BackendOptions
from onnxforge.ir import Model
from onnxforge.pipeline import Pass, create_passes
from onnxforge.pipeline.base import build_options
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.tunables import Choice, Interval, SearchTarget, Subset, Tunable

# What a search may use when --passes does not say: the lossless passes always run (an opset below 13 is moved to
# 13, where per-channel int8 is written; cleanup; fusions); each lossy pass is in or out, in this order (structure
# first, precision last).
DEFAULT_PASSES = ("upgrade-opset:to=13", "cleanup", "fuse", "prune", "lowrank", "quant", "fp16", "bf16")
SESSION = "session"  # the prefix of the session settings' parameters


@dataclass(frozen=True)
class SessionSettings:
    """How the deployment creates its inference session (onnxruntime): intra-op threads (None: onnxruntime's
    default, one per physical core), graph optimization level and execution mode."""

    threads: int | None = None
    graph_optimization: str = "all"
    execution_mode: str = "sequential"

    def backend_options(self, target: str, extra: dict[str, str]) -> BackendOptions:
        return BackendOptions(
            target=target, threads=self.threads, graph_optimization=self.graph_optimization,  # type: ignore[arg-type]
            execution_mode=self.execution_mode, extra=extra,  # type: ignore[arg-type]
        )

    def for_onnxruntime(self) -> dict[str, Any]:
        """The settings as `onnxruntime.SessionOptions` attributes spell them, for a deployment to copy."""
        levels = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
        return {
            "intra_op_num_threads": self.threads or 0,
            "graph_optimization_level": levels[self.graph_optimization],
            "execution_mode": "ORT_PARALLEL" if self.execution_mode == "parallel" else "ORT_SEQUENTIAL",
        }


@dataclass(frozen=True)
class Candidate:
    """One point of the space: the pipeline as `optimize --passes` takes it, and the session settings.
    `step_back`: built as a plain `optimize` run builds it (the starting points): a lossy pass outside its share
    of the budget is stepped back to the strongest of its gentler settings that fits, else left out; without it,
    such a candidate is rejected."""

    passes: tuple[str, ...]
    session: SessionSettings
    step_back: bool = False

    @property
    def pipeline(self) -> str:
        return ",".join(self.passes)

    @property
    def model_key(self) -> str:
        """The same for candidates that build the same model (session settings do not change it)."""
        return f"{self.pipeline} | stepped back" if self.step_back else self.pipeline

    @property
    def key(self) -> str:
        """The same for candidates that build the same model and time it the same way."""
        stepping = " | stepped back" if self.step_back else ""
        return f"{self.pipeline} | {sorted(asdict(self.session).items())}{stepping}"


@dataclass(frozen=True)
class _Searched:
    """A lossy pass the search may put in or leave out, and its tunables."""

    prefix: str  # of its parameters: its name, with "#2" for a second one of the same name
    pass_type: type[Pass]
    tunables: dict[str, Tunable]


class SearchSpace:
    """The lossless passes every candidate runs, the lossy passes a candidate may run (each in or out, in the
    order given) with their tunables, and the session settings (onnxruntime only)."""

    def __init__(self, steps: list[Pass | _Searched], session: dict[str, Tunable]):
        self._steps = steps
        self._session = session

    @classmethod
    def build(
        cls, model: Model, where: SearchTarget, passes: Sequence[str] | str | None = None, cores: int | None = None
    ) -> SearchSpace:
        """The space on `model` for `where`, from `passes` (a pass list: what the search may use, in order; its
        lossless passes always run as given) or DEFAULT_PASSES; a lossy pass whose `search_space` offers nothing
        for `where` is left out. Thread counts up to `cores` (default: this machine's)."""
        steps: list[Pass | _Searched] = []
        seen: dict[str, int] = {}
        prepared = None
        for step in create_passes(passes if passes is not None else list(DEFAULT_PASSES)):
            if step.lossless:
                steps.append(step)
                continue
            if prepared is None:
                prepared = _as_lossy_passes_see_it(model, [s for s in steps if isinstance(s, Pass)], where)
            tunables = type(step).search_space(prepared, where)
            if tunables is None:
                continue
            seen[step.name] = seen.get(step.name, 0) + 1
            prefix = step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}"
            given = {f.name: getattr(step.options, f.name) for f in dataclasses.fields(step.options)}
            fixed = {name: value for name, value in given.items() if value != getattr(step.Options(), name)}
            # Options the pass list sets are kept, not searched.
            tunables = {name: tunable for name, tunable in tunables.items() if name not in fixed}
            kept = {name: Choice((_plain(value),)) for name, value in fixed.items()}
            steps.append(_Searched(prefix, type(step), {**tunables, **kept}))
        session = _session_tunables(cores or os.cpu_count() or 1) if where.backend == "ort" else {}
        return cls(steps, session)

    @property
    def searched_passes(self) -> list[str]:
        return [step.prefix for step in self._steps if isinstance(step, _Searched)]

    def describe(self) -> dict[str, Any]:
        """The space as the report shows it: the fixed passes, each searched pass's tunables, the session's."""
        return {
            "always": [step.describe() for step in self._steps if isinstance(step, Pass)],
            "searched": {
                step.prefix: {name: _describe(tunable) for name, tunable in step.tunables.items()}
                for step in self._steps
                if isinstance(step, _Searched)
            },
            "session": {name: _describe(tunable) for name, tunable in self._session.items()},
            "size": self.size(),
        }

    def size(self) -> int:
        """How many candidates the space holds (grid points: each pass in or out, every tunable value)."""
        return math.prod(len(values) for values in self.grid().values())

    def grid(self) -> dict[str, list[Any]]:
        """Every parameter with all its values, as Optuna's GridSampler takes them."""
        grid: dict[str, list[Any]] = {}
        for step in self._steps:
            if isinstance(step, _Searched):
                grid[step.prefix] = [False, True]
                for name, tunable in step.tunables.items():
                    grid.update(_grid(f"{step.prefix}.{name}", tunable))
        for name, tunable in self._session.items():
            grid.update(_grid(f"{SESSION}.{name}", tunable))
        return grid

    def suggest(self, trial: optuna.Trial, conditional: bool = True) -> Candidate:
        """The candidate of `trial`'s suggestions. `conditional`: a pass's tunables are suggested only when the
        pass is in (what TPE learns best from); else every parameter is suggested in every trial (a grid)."""
        passes: list[str] = []
        for step in self._steps:
            if isinstance(step, Pass):
                passes.append(step.describe())
                continue
            used = trial.suggest_categorical(step.prefix, [False, True])
            if not used and conditional:
                continue
            options = {name: _suggest(trial, f"{step.prefix}.{name}", t) for name, t in step.tunables.items()}
            if used:
                passes.append(step.pass_type(build_options(step.pass_type.Options, options, step.pass_type.name))
                              .describe())
        session = {name: _suggest(trial, f"{SESSION}.{name}", t) for name, t in self._session.items()}
        return Candidate(tuple(passes), SessionSettings(**session))

    def starting_points(self) -> list[dict[str, Any]]:
        """Parameters to try first, each searched pass at its defaults: none of them (the lossless passes alone),
        the last (precision: the cheapest to build) alone, all of them, then each other one alone; the session at
        its defaults. Values off the space are left to the sampler."""
        searched = [step for step in self._steps if isinstance(step, _Searched)]
        session = {f"{SESSION}.{name}": getattr(SessionSettings(), name) for name in self._session}
        points = []
        alone = [[step] for step in searched]
        for chosen in [[], *alone[-1:], *([searched] if len(searched) > 1 else []), *alone[:-1]]:
            params: dict[str, Any] = {step.prefix: step in chosen for step in searched}
            for step in chosen:
                defaults = step.pass_type.Options()
                for name, tunable in step.tunables.items():
                    value = getattr(defaults, name)
                    if isinstance(tunable, Subset):
                        params.update({f"{step.prefix}.{name}:{item}": item in value for item in tunable.items})
                    elif _plain(value) in _values(tunable):
                        params[f"{step.prefix}.{name}"] = _plain(value)
            points.append({**params, **session})
        return points


def _as_lossy_passes_see_it(model: Model, lossless: list[Pass], where: SearchTarget) -> Model:
    """`model` after the lossless passes that run before the lossy ones (cleanup turns Constant-node weights into
    the initializers prune and lowrank look for), run unchecked on a copy: only to see what the lossy passes find;
    the model itself where one of them fails."""
    work = model.copy()
    context = PassContext(backend=where.backend, target=where.target)
    try:
        for step in lossless:
            step.run(work, context)
            context.invalidate()
    except Exception:  # noqa: BLE001  (a pass that fails here is rolled back in the real runs: so it is here)
        return model
    return work


def candidate_of(params: dict[str, Any], space: SearchSpace) -> Candidate:
    """The candidate a finished trial's parameters stand for."""
    return space.suggest(optuna.trial.FixedTrial(params))


def _session_tunables(cores: int) -> dict[str, Tunable]:
    threads = sorted({1, *(2**k for k in range(1, 8) if 2**k < cores), cores})
    return {
        "threads": Choice((None, *threads)) if cores > 1 else Choice((None,)),
        "graph_optimization": Choice(("all", "extended")),
        "execution_mode": Choice(("sequential", "parallel")),
    }


def _suggest(trial: optuna.Trial, name: str, tunable: Tunable) -> Any:
    if isinstance(tunable, Choice):
        return trial.suggest_categorical(name, list(tunable.values))
    if isinstance(tunable, Interval):
        if tunable.integer:
            return trial.suggest_int(name, int(tunable.low), int(tunable.high), step=int(tunable.step))
        return round(trial.suggest_float(name, tunable.low, tunable.high, step=tunable.step), 10)
    left_out = [item for item in tunable.items if trial.suggest_categorical(f"{name}:{item}", [False, True])]
    return left_out


def _grid(name: str, tunable: Tunable) -> dict[str, list[Any]]:
    if isinstance(tunable, Subset):
        return {f"{name}:{item}": [False, True] for item in tunable.items}
    return {name: list(_values(tunable))}


def _values(tunable: Tunable) -> list[Any]:
    if isinstance(tunable, Choice):
        return list(tunable.values)
    if isinstance(tunable, Interval):
        return tunable.values()
    return []


def _describe(tunable: Tunable) -> Any:
    if isinstance(tunable, Subset):
        return {"leave out any of": list(tunable.items)}
    return _values(tunable)


def _plain(value: Any) -> Any:
    """An option value as an Optuna parameter holds it (lists joined as the pass list writes them)."""
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else value
