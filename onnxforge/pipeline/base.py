"""What a pass is: a named transformation with typed options that returns what it changed."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from onnxforge.errors import PassError
from onnxforge.ir import Model

if TYPE_CHECKING:
    from onnxforge.pipeline.acceptance import Acceptance
    from onnxforge.pipeline.context import PassContext
    from onnxforge.pipeline.tunables import SearchTarget, Tunable

T = TypeVar("T")


@dataclass
class LayerDecision:
    """What a pass decided for one layer, for the report's per-layer tables.

    `layer` names it as the pass's notes do ("Conv /conv1/Conv"), `decision` is what it got ("int8 static,
    per-channel symmetric weights, QLinearConv", "float", "24 of 48 channels", "rank 12 of 48") and `why` the
    reason. `error` is a figure the pass measured for this layer alone (quant: the share of the budget the model
    spends with only this layer quantized), `error_text` says what it is; None where the pass measured none.
    """

    layer: str
    decision: str
    why: str = ""
    error: float | None = None
    error_text: str = ""


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, counters for the report, and analyses it kept valid.

    `notes` say in plain words what the pass decided and why (which layers it changed, which it left alone);
    `optimize --explain` prints them. `layers` hold the same per-layer decisions as data, for the report.
    """

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    preserved: tuple[type[Analysis], ...] = ()
    notes: list[str] = field(default_factory=list)
    layers: list[LayerDecision] = field(default_factory=list)


class Analysis:
    """A fact computed from a model on demand (a graph view, channel groups, ...), cached by the pass context.

    Subclasses implement `compute`; the cache drops every analysis a changing pass did not list as preserved.
    """

    @classmethod
    def compute(cls, model: Model) -> Any:
        raise NotImplementedError


@dataclass
class NoOptions:
    """This pass takes no options."""


class Pass:
    """Base of every pass. Subclasses set `Options` (a dataclass) and implement `run`.

    `lossless = True` promises the outputs do not change (beyond float rounding): the pass manager checks it.
    A lossy pass may spend its share of the run's error budget (`ctx.budget`); the pass manager steps back a
    result outside the budget. A lossy pass that promises speed or size declares it in `acceptance`: the pass manager keeps its result only
    if it reaches that.
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    # Wins back accuracy the lossy passes before it cost (distill): the error budget judges them after it.
    recovers: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = build_options(self.Options, kwargs, self.name)
        elif kwargs:
            raise TypeError("give either an options object or keyword options, not both")
        self.options = options

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def acceptance(self) -> Acceptance | None:
        """What a result of this pass must reach (speed, size) for the pass manager to keep it rather than the model
        before the pass; None (the default): kept once verified. Run directly, a pass is not judged."""
        return None

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

    @classmethod
    def search_space(cls, model: Model, where: SearchTarget) -> dict[str, Tunable] | None:
        """The options a search (`optimize --auto`) may tune when this pass runs on `model` for `where`, by option
        name; options left out keep their defaults. None (the default): a search does not offer this pass there;
        {}: it offers it at its defaults."""
        return None

    def gentler(self) -> list[Pass]:
        """This pass at gentler settings (less pruned, a higher rank), strongest first, for a pass manager to try
        when the result breaks the pass's share of the error budget: it keeps the strongest that fits. Empty (the
        default) when the pass spends its share itself (quant) or has no such setting."""
        return []

    def parts(self) -> list[Pass]:
        """Smaller passes that together do what this one does, for a pass manager to verify one by one when this
        one fails its checks as a whole (a fusion pass's rules); empty when it does not split."""
        return []


class CompositePass(Pass):
    """A pass made of member passes run in rounds until a round changes nothing (`cleanup`, `fuse`).

    Run by a pass manager, each member is verified, judged by its `acceptance`, and rolled back, on its own, as if
    it stood in the pipeline: one member that breaks the model does not cost the others. Members that are all
    lossless and declare no acceptance are checked once as a whole first, and one by one only if that fails.
    Run directly, the members run unchecked. Options have `max_rounds`.
    """

    def members(self) -> list[Pass]:
        raise NotImplementedError

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return run_until_stable(self.members(), model, ctx, self.options.max_rounds)

    def checked_whole(self) -> bool:
        """Whether a pass manager may check this pass once as a whole before its members: every member, nested
        ones included, is lossless and declares no acceptance."""
        return all(
            member.lossless
            and member.acceptance() is None
            and (not isinstance(member, CompositePass) or member.checked_whole())
            for member in self.members()
        )


class Pipeline(CompositePass):
    """A list of passes used as one pass (in another pipeline, a plugin, a config): run once in order, or in rounds
    with `max_rounds`. A pass manager runs its members as it runs its own passes: each verified, judged by its
    acceptance and rolled back on its own, with its decisions keyed by its place inside the pipeline."""

    name = "pipeline"

    @dataclass
    class Options:
        max_rounds: int = 1

    def __init__(self, passes: Sequence[Pass], max_rounds: int = 1):
        super().__init__(max_rounds=max_rounds)
        self._members = list(passes)
        self.lossless = all(member.lossless for member in self._members)  # type: ignore[misc]

    def members(self) -> list[Pass]:
        return list(self._members)

    def describe(self) -> str:
        rounds = f":max_rounds={self.options.max_rounds}" if self.options.max_rounds != 1 else ""
        return f"pipeline({','.join(member.describe() for member in self._members)}){rounds}"


def run_until_stable(steps: list[Pass], model: Model, ctx: PassContext, max_rounds: int) -> PassResult:
    """Run `steps` in rounds until a round changes nothing (at most `max_rounds`); sum their integer counters.

    What composite passes (`cleanup`, `fuse`) do; cached analyses are dropped after each changing step.
    """
    totals: dict[str, Any] = {}
    notes: list[str] = []
    layers: list[LayerDecision] = []
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
            layers += result.layers
        changed |= round_changed
        if not round_changed:
            break
    return PassResult(changed=changed, stats=totals, notes=notes, layers=layers)


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
