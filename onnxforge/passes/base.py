"""What a pass is: a named transformation with typed options that returns what it changed."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from onnxforge.backends.base import BackendCapabilities, BackendOptions, Prepared
from onnxforge.errors import PassError
from onnxforge.feeds import Feeds
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import InterleavedTiming, RelativeLatency, interleaved_latency
from onnxforge.passes.decisions import Decision, Decisions, Measured

T = TypeVar("T")


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, counters for the report, and analyses it kept valid.

    `notes` say in plain words what the pass decided and why (which layers it changed, which it left alone);
    `optimize --explain` prints them.
    """

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    preserved: tuple[type[Analysis], ...] = ()
    notes: list[str] = field(default_factory=list)


class Analysis:
    """A fact computed from a model on demand (a graph view, channel groups, ...), cached by the pass context.

    Subclasses implement `compute`; the cache drops every analysis a changing pass did not list as preserved.
    """

    @classmethod
    def compute(cls, model: Model) -> Any:
        raise NotImplementedError


class PassContext:
    """Per-run state shared by passes: the analysis cache, sample data, and the backend and target to run on.

    Passes that run or time models (calibration, measured choices) do it through `prepare` and
    `time_models`, so that no pass imports a backend, on inputs from `feed` (or `data`, the real samples): the
    run's one `Feeds` decides them, so --data, --shape and dims found by running the model apply to every pass.
    A choice made by timing goes through `decide`, which records it, or replays it from `decisions` given from
    an earlier run.
    """

    def __init__(
        self,
        data: list[dict] | None = None,
        backend: str = "ort",
        target: str = "cpu",
        threads: int | None = None,
        timing: InterleavedTiming | None = None,
        decisions: Decisions | None = None,
        feeds: Feeds | None = None,
    ):
        self.data = data
        self.feeds = feeds if feeds is not None else Feeds(samples=data)
        self.backend = backend
        self.target = target
        self.threads = threads
        self.timing = timing or InterleavedTiming()
        self.decisions = decisions or Decisions()
        self._cache: dict[type[Analysis], tuple[int, Any]] = {}
        self._pass_position = ""

    def begin_pass(self, index: int, pass_: Pass) -> None:
        """Note which pass runs now (its position in the pipeline and description): it keys its decisions."""
        self._pass_position = f"{index}:{pass_.describe()}"

    def decide(self, what: str, measure: Callable[[], Measured], allowed: Collection[Any] | None = None) -> Decision:
        """The running pass's decision on `what`: measured by `measure` and recorded, or replayed without
        measuring from the decisions given to the run (DecisionsError if they lack it, or if it is not one of
        `allowed`)."""
        return self.decisions.decide(self._pass_position + "/" + what, measure, allowed)

    def replayed_decisions(self) -> int:
        """How many of the running pass's decisions so far were replayed rather than measured."""
        prefix = self._pass_position + "/"
        return sum(d.replayed for key, d in self.decisions.made.items() if key.startswith(prefix))

    @property
    def capabilities(self) -> BackendCapabilities:
        """What this run's backend can run (contrib ops, static shapes): passes ask this, never the name."""
        from onnxforge.backends import get_backend

        return get_backend(self.backend).capabilities

    def prepare(self, model: Model | bytes, graph_optimization: str = "all") -> Prepared:
        """Load or compile `model` on this run's backend and target, ready to run or time."""
        from onnxforge.backends import get_backend

        options = BackendOptions(target=self.target, threads=self.threads, graph_optimization=graph_optimization)
        return get_backend(self.backend).prepare(model, options)

    def feed(self, model: Model) -> dict[str, np.ndarray]:
        """The inputs to run or time `model` on once: the first --data sample, else random inputs of the shapes
        the run decided (--shape, or dims found by running the model on this context's backend)."""
        return self.feeds.first(skeleton_proto(model), lambda: self.prepare(model).run)

    def time_models(self, prepared: Sequence[Prepared], inputs: Mapping[str, np.ndarray]) -> list[RelativeLatency]:
        """Time prepared models against each other in interleaved blocks; speedups are relative to the first."""
        feed = dict(inputs)
        return interleaved_latency([lambda p=p: p.run(feed) for p in prepared], self.timing)

    def analysis(self, kind: type[Analysis], model: Model) -> Any:
        """Return `kind` computed on `model`, from the cache when still valid."""
        cached = self._cache.get(kind)
        if cached is not None and cached[0] == id(model.graph):
            return cached[1]
        value = kind.compute(model)
        self._cache[kind] = (id(model.graph), value)
        return value

    def invalidate(self, preserved: tuple[type[Analysis], ...] = ()) -> None:
        """Forget every cached analysis except the preserved ones."""
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}


@dataclass
class NoOptions:
    """This pass takes no options."""


class Pass:
    """Base of every pass. Subclasses set `Options` (a dataclass) and implement `run`.

    `lossless = True` promises the outputs do not change (beyond float rounding): the pass manager checks it.
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = build_options(self.Options, kwargs, self.name)
        elif kwargs:
            raise TypeError("give either an options object or keyword options, not both")
        self.options = options

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def describe(self) -> str:
        """The pass name with its non-default options, as written on the command line."""
        defaults = self.Options()
        changed = [
            f"{f.name}={_format_value(getattr(self.options, f.name))}"
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != getattr(defaults, f.name)
        ]
        return ":".join([self.name, *changed])

    @classmethod
    def summary(cls) -> str:
        """First line of the pass docstring."""
        lines = (cls.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""

    def parts(self) -> list[Pass]:
        """Smaller passes that together do what this one does, for a pass manager to verify one by one when this
        one fails its checks as a whole (a fusion pass's rules); empty when it does not split."""
        return []


class CompositePass(Pass):
    """A pass made of member passes run in rounds until a round changes nothing (`cleanup`, `fuse`).

    Run by a pass manager, each member is verified, and rolled back, on its own: one member that breaks the
    model does not cost the others. Run directly, the members run unverified. Options have `max_rounds`.
    """

    def members(self) -> list[Pass]:
        raise NotImplementedError

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return run_until_stable(self.members(), model, ctx, self.options.max_rounds)


def run_until_stable(steps: list[Pass], model: Model, ctx: PassContext, max_rounds: int) -> PassResult:
    """Run `steps` in rounds until a round changes nothing (at most `max_rounds`); sum their integer counters.

    What composite passes (`cleanup`, `fuse`) do; cached analyses are dropped after each changing step.
    """
    totals: dict[str, Any] = {}
    notes: list[str] = []
    changed = False
    for _ in range(max_rounds):
        round_changed = False
        for step in steps:
            result = step.run(model, ctx)
            if result.changed:
                ctx.invalidate(result.preserved)
                round_changed = True
            add_counters(totals, result.stats)
            notes += result.notes
        changed |= round_changed
        if not round_changed:
            break
    return PassResult(changed=changed, stats=totals, notes=notes)


def add_counters(totals: dict[str, Any], stats: Mapping[str, Any]) -> None:
    """Add a step's integer counters to `totals`; other values replace what was there."""
    for key, value in stats.items():
        if isinstance(value, int) and not isinstance(value, bool):
            totals[key] = totals.get(key, 0) + value
        else:
            totals[key] = value


def build_options(options_type: type[T], values: Mapping[str, Any], pass_name: str) -> T:
    """Build the options dataclass from keyword values, converting strings ('0.3', 'true') to the field types."""
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    hints = typing.get_type_hints(options_type)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(fields) or "none"
            raise PassError(f"pass '{pass_name}' has no option '{key}' (options: {known})")
        kwargs[name] = convert_option(value, hints[name], f"{pass_name}:{key}")
    return options_type(**kwargs)


def convert_option(value: Any, hint: Any, where: str) -> Any:
    """Convert one option value to the annotated type; raise PassError naming `where` if it does not fit."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        text = value if not isinstance(value, str) else value.strip()
        for choice in args:
            if text == choice or str(choice) == str(text):
                return choice
        raise PassError(f"bad value '{value}' for {where}: choose one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in args):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_option(value, arg, where)
            except PassError as exc:
                errors.append(str(exc))
        raise PassError(errors[0] if errors else f"bad value '{value}' for {where}")
    if origin in (list, tuple):
        items = value.split("+") if isinstance(value, str) else list(value)
        items = [item for item in items if item != ""]
        converted = [convert_option(item, args[0] if args else str, where) for item in items]
        return converted if origin is list else tuple(converted)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise PassError(f"bad value '{value}' for {where}: expected true or false")
    if hint in (int, float, str):
        try:
            converted = hint(value)
        except (TypeError, ValueError):
            raise PassError(f"bad value '{value}' for {where}: expected {hint.__name__}") from None
        if hint is int and isinstance(value, float) and converted != value:
            raise PassError(f"bad value '{value}' for {where}: expected int")
        return converted
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
