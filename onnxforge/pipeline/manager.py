"""Runs passes in order, records what each changed and cost, verifies each, rolls back failures, and steps back
lossy results that miss what their pass declared in `acceptance` or break the run's error budget."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from onnxforge.comparison import compare_outputs
from onnxforge.errors import OnnxforgeError, PassUsageError
from onnxforge.ir import Model, ModelStats
from onnxforge.limits import TimeLimitError, check_deadlines, time_limit
from onnxforge.pipeline.base import CompositePass, LayerDecision, Pass, PassResult, add_counters
from onnxforge.pipeline.budget import Budget, BudgetTracker, Losses, PassBudget, strongest_within
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.verifier import Verifier, VerifyOptions, as_declared

# Random input sets the budget is measured on without --data.
BUDGET_RANDOM_INPUTS = 8
OnError = Literal["rollback", "stop"]


class PassFailedError(OnnxforgeError):
    """A pass broke the model and the run was asked to stop (`--on-error stop`)."""


@dataclass
class PassRecord:
    """One pass in a run: status (applied, unchanged, rolled_back, failed), time, sizes, counters, checks."""

    name: str
    status: str
    seconds: float
    before: ModelStats
    after: ModelStats
    stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)
    layers: list[LayerDecision] = field(default_factory=list)  # the pass's decisions per layer, for the report
    budget: str = ""  # a lossy pass's result against the run's error budget, one line
    over_budget: bool = False  # the budget, not the pass or its acceptance, left the model as it was
    # A composite pass's members that changed the model or were rolled back: name, status ("applied" if it ever
    # applied, else "rolled_back"), error (why it was last rolled back, if it was).
    members: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        record = {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 6),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "stats": self.stats,
            "error": self.error,
            "max_rel_error_vs_previous": self.max_rel_error,
            "notes": self.notes,
            "budget": self.budget or None,
            "members": self.members,
        }
        if self.layers:
            record["layers"] = [asdict(layer) for layer in self.layers]
        return record


class Instrument:
    """Hooks around every pass (progress display, logging, timing plots) that never change the model."""

    def before_pass(self, index: int, total: int, pass_: Pass, model: Model) -> None:
        pass

    def after_pass(self, index: int, total: int, record: PassRecord) -> None:
        pass

    def progress(self, line: str) -> None:
        """A line from the running pass on how it is getting on (`ctx.progress`)."""


class PassManager:
    """Run a pipeline of passes on a model.

    After each pass that changed the model, the verifier checks it (valid ONNX, loads, same outputs for
    lossless passes), then a lossy pass's declared acceptance (speed, size) is judged against the model before
    it: a result that falls short is stepped back, and the pass recorded unchanged with notes that say why.

    With a `budget`, each lossy pass may spend a share of it (`ctx.budget`: what is left, split evenly among the
    lossy passes still to run), and its result is measured against the original model on the budget's samples
    (the held-out --data samples, else the verification inputs): a result outside its share is stepped back to
    the strongest of the pass's gentler settings that fits (with `step_back` False: to the model before it), and
    a result outside the budget to the model before it.
    Lossy passes followed by one that wins accuracy back (`recovers`: distill) are judged together after it, and
    stepped back together if the budget is still broken there. Such a pass finds the model before the first
    lossy pass in `ctx.teacher`.
    A failing or crashing pass is rolled back and the run continues, or with
    on_error="stop" the run ends with PassFailedError. A pass raising PassUsageError (asked for what it
    cannot do with any model) ends the run with that error either way.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        verify: VerifyOptions | None = None,
        on_error: OnError = "rollback",
        instruments: Sequence[Instrument] = (),
        context: PassContext | None = None,
        pass_timeout: float | None = None,
        budget: Budget | None = None,
        step_back: bool = True,
    ):
        if on_error not in ("rollback", "stop"):
            raise OnnxforgeError(f"on_error must be 'rollback' or 'stop', not '{on_error}'")
        if pass_timeout is not None and not pass_timeout > 0:
            raise OnnxforgeError(f"the pass timeout must be more than 0 seconds, got {pass_timeout}")
        self.pass_timeout = pass_timeout
        self.passes = list(passes)
        self.verify = verify or VerifyOptions()
        self.on_error = on_error
        self.instruments = list(instruments)
        self.context = context or PassContext()
        self.verifier = Verifier(self.verify) if self.verify.enabled else None
        self._position = ""  # the running pass's place: "3", or "3.1.2" for a composite's member (round, step)
        self.budget = budget
        self.step_back = step_back
        self.tracker: BudgetTracker | None = None
        self._lossy_left = 0  # lossy passes (composites' members counted) that have not started yet
        self._started: set[int] = set()
        self._deferred = False  # the running pass is judged against the budget after a later `recovers` pass
        self.context.on_progress = self._progress

    def run(self, model: Model, source: str | bytes | None = None) -> tuple[Model, list[PassRecord]]:
        """Apply the passes to a copy of `model`; return the result and one record per pass.

        `source`, the file (path or bytes) `model` was imported from, gives verification its reference outputs.
        """
        current = model.copy()
        reference = self.verifier.reference(current, source) if self.verifier else []
        self._lossy_left = sum(_lossy_leaves(pass_) for pass_ in self.passes)
        self.tracker = self._track_budget(current) if self.budget is not None and self._lossy_left else None
        records: list[PassRecord] = []
        checkpoint: tuple[int, Model, list] | None = None  # before the lossy passes a `recovers` pass judges
        total = len(self.passes)
        for index, pass_ in enumerate(self.passes, start=1):
            check_deadlines()
            for instrument in self.instruments:
                instrument.before_pass(index, total, pass_, current)
            self._position = str(index)
            self.context.begin_pass(self._position, pass_)
            recovering_later = any(later.recovers for later in self.passes[index:])
            if _lossy_leaves(pass_) and recovering_later and self.context.teacher is None:
                self.context.teacher = current.copy()
            self._deferred = self.tracker is not None and recovering_later
            if self._deferred and _lossy_leaves(pass_) and checkpoint is None:
                checkpoint = (len(records), current.copy(), reference)
            try:
                current, reference, record = self._run_one(pass_, current, reference)
            except PassUsageError as exc:
                stats = current.stats()
                failed = PassRecord(pass_.describe(), "failed", 0.0, stats, stats, error=str(exc))
                for instrument in self.instruments:
                    instrument.after_pass(index, total, failed)
                raise
            records.append(record)
            if pass_.recovers and checkpoint is not None:
                current, reference = self._judge_recovered(current, reference, records, checkpoint)
                checkpoint = None
            for instrument in self.instruments:
                instrument.after_pass(index, total, record)
            if record.status == "failed":
                raise PassFailedError(f"pass '{record.name}' failed: {record.error}")
        return current, records

    def _run_one(self, pass_: Pass, model: Model, reference: list) -> tuple[Model, list, PassRecord]:
        """Run and check one pass within the pass timeout: a pass (or its check) that outlasts it is rolled back
        (failed with on_error="stop") even if it caught the TimeLimitError and went on."""
        snapshot = model.copy()
        start = time.perf_counter()
        deadline = None
        message = f"exceeded --pass-timeout {self.pass_timeout:g} s" if self.pass_timeout else ""
        try:
            with time_limit(self.pass_timeout, message) as deadline:
                outcome = self._attempt(pass_, model, reference, snapshot)
        except TimeLimitError as exc:
            if deadline is None or exc.deadline is not deadline:
                raise
        if deadline is None or not deadline.expired:
            return outcome
        self.context.invalidate()
        before = snapshot.stats()
        status = "failed" if self.on_error == "stop" else "rolled_back"
        record = PassRecord(pass_.describe(), status, time.perf_counter() - start, before, before, error=message)
        return snapshot, reference, record

    def _attempt(
        self, pass_: Pass, model: Model, reference: list, snapshot: Model
    ) -> tuple[Model, list, PassRecord]:
        before = model.stats()
        start = time.perf_counter()
        step = self._checked(pass_, model, reference, snapshot)
        record = PassRecord(pass_.describe(), "unchanged", time.perf_counter() - start, before, before)
        record.members = step.members
        record.max_rel_error = step.max_rel_error
        record.budget, record.over_budget = step.budget, step.over_budget
        if step.result is not None:
            record.notes = list(step.result.notes)
            record.layers = list(step.result.layers)
            record.stats = step.result.stats
        if step.error:
            record.error = step.error
            record.status = "failed" if self.on_error == "stop" else "rolled_back"
            return snapshot, step.reference, record
        if step.result.changed:
            record.status = "applied"
            record.after = step.model.stats()
        return step.model, step.reference, record

    def _step(self, pass_: Pass, model: Model, reference: list, snapshot: Model) -> _Step:
        """Run `pass_` on `model` and verify it if it changed anything; on failure the step holds `snapshot`."""
        before = model.stats()
        share = self.context.budget = self._share(pass_)
        try:
            result = pass_.run(model, self.context)
            error = "" if isinstance(result, PassResult) else f"returned {type(result).__name__}, not PassResult"
        except PassUsageError:
            raise
        except OnnxforgeError as exc:
            result, error = None, str(exc)
        except Exception as exc:  # a crashing pass is reported and rolled back like a breaking one
            result, error = None, f"crashed: {type(exc).__name__}: {exc} ({_where(exc)})"
        finally:
            self.context.budget = None
        if error:
            self.context.invalidate()
            return _Step(snapshot, reference, None, error)
        if not result.changed and model.stats() != before:
            # The pass changed the model without saying so: verify it all the same.
            result.changed = True
            result.stats = {**result.stats, "unreported_change": True}
        if not result.changed:
            return _Step(model, reference, result)
        self.context.invalidate(result.preserved)
        if share is not None and pass_.gentler():
            model, result = self._spend(pass_, model, result, snapshot, share)
            if not result.changed:
                return _Step(snapshot, reference, result, budget=result.notes[-1], over_budget=True)
        outputs, max_rel = reference, None
        if self.verifier:
            verdict = self.verifier.check(model, reference, pass_.lossless)
            max_rel = verdict.comparison.max_rel if verdict.comparison is not None else None
            if not verdict.ok:
                self.context.invalidate()
                return _Step(snapshot, reference, result, verdict.reason, max_rel)
            outputs = verdict.outputs
        budget, losses = self._against_budget(pass_, model, result)
        if not result.changed:
            self.context.invalidate()
            return _Step(snapshot, reference, result, budget=budget, over_budget=True)
        if not self._accepted(pass_, snapshot, model, result):
            self.context.invalidate()
            return _Step(snapshot, reference, result, budget=budget)
        if losses is not None:
            self.tracker.spent = losses
        return _Step(model, outputs, result, "", max_rel, budget=budget)

    def _progress(self, line: str) -> None:
        for instrument in self.instruments:
            instrument.progress(line)

    def _track_budget(self, model: Model) -> BudgetTracker:
        """The run's budget against `model`, on the held-out --data samples, else on the verification inputs (or,
        without verification, random inputs drawn as verification draws them)."""
        calibration = self.context.calibration
        if calibration.samples:
            held_out = calibration.split()[1]
            if len(held_out) == len(calibration.samples):
                where = f"the {len(held_out)} --data samples (fewer than 4: none held out)"
            else:
                where = f"{len(held_out)} held-out --data samples"
            samples = held_out
        else:
            samples = self._random_inputs(model)
            where = f"{len(samples)} random input sets"
        return BudgetTracker(self.budget, samples, where, self._outputs, model)

    def _random_inputs(self, model: Model) -> list[dict]:
        """BUDGET_RANDOM_INPUTS random input sets, drawn as verification draws its own (its seed, its shapes): more
        than verification's two, since a model's outputs can agree on two random inputs and not on the next."""
        seed = self.verifier.seed if self.verifier else self.verify.seed
        verifier = Verifier(replace(self.verify, samples=BUDGET_RANDOM_INPUTS, seed=seed))
        verifier.reference(model)
        return verifier.inputs

    def _outputs(self, model: Model, samples: list[dict]) -> list[dict]:
        run = self.context.calibration.runner(model)
        return [run(sample) for sample in as_declared(model, samples)]

    def _share(self, pass_: Pass) -> PassBudget | None:
        """The running lossy pass's share of the budget (None when there is no budget to spend now)."""
        if self.tracker is None or pass_.lossless or pass_.recovers or isinstance(pass_, CompositePass):
            return None
        ways = max(self._lossy_left, 1)
        if id(pass_) not in self._started:
            self._started.add(id(pass_))
            self._lossy_left -= 1
        return None if self._deferred else self.tracker.share(ways)

    def _spend(
        self, pass_: Pass, model: Model, result: PassResult, snapshot: Model, share: PassBudget
    ) -> tuple[Model, PassResult]:
        """The result of `pass_`, or of the strongest of its gentler settings, that keeps within its `share` of the
        budget against `snapshot` (the model before it); a result that changes nothing when none does."""
        reference = self._outputs(snapshot, share.samples)
        settings = [pass_, *pass_.gentler()] if self.step_back else [pass_]
        outcomes: dict[int, tuple[Model, PassResult]] = {0: (model, result)}

        def fits(index: int) -> bool:
            if index not in outcomes:
                work = snapshot.copy()
                try:
                    outcomes[index] = (work, settings[index].run(work, self.context))
                except PassUsageError:
                    raise
                except Exception:  # a setting that fails is one that does not fit
                    return False
            work, outcome = outcomes[index]
            kept = not outcome.changed or share.fits(reference, self._outputs(work, share.samples))
            if not kept:
                del outcomes[index]
            return kept

        chosen, tried = strongest_within(range(len(settings)), fits)
        where = f"this pass's share of the budget ({share.budget.describe()} on {share.where})"
        if chosen is None or not outcomes[chosen][1].changed:
            tried_down_to = f"down to {settings[-1].describe()}" if len(settings) > 1 else f"at {pass_.describe()}"
            note = f"no change {tried_down_to} keeps within {where}: the model is left as it was"
            return snapshot, PassResult(False, notes=[*result.notes, note], layers=result.layers)
        model, result = outcomes[chosen]
        if chosen:
            note = f"{settings[chosen].describe()}: the strongest of {len(settings)} settings within {where}"
            result.notes = [f"{note} ({tried} tried)", *result.notes]
        return model, result

    def _against_budget(self, pass_: Pass, model: Model, result: PassResult) -> tuple[str, Losses | None]:
        """Measure a lossy pass's result against the original on the budget's samples: the line for the pass's
        record and, within the budget, the losses; outside it, the result is stepped back (result.changed turns
        False). ("", None) when the budget is not checked here."""
        if self.tracker is None or pass_.lossless or pass_.recovers or self._deferred:
            return "", None
        losses = self.tracker.losses(model)
        line = self.tracker.verdict(losses)
        result.stats = {**result.stats, "budget_spent": round(self.tracker.budget.spent(losses), 2)}
        if self.tracker.budget.fits(losses):
            return line, losses
        result.changed = False
        policy = pass_.acceptance()
        result.stats.update(dict.fromkeys(policy.zeroed if policy else (), 0))
        result.notes = [*result.notes, line, "over the budget: the model is left as it was"]
        return f"{line}: stepped back", None

    def _judge_recovered(
        self, model: Model, reference: list, records: list[PassRecord], checkpoint: tuple[int, Model, list]
    ) -> tuple[Model, list]:
        """After a pass that wins accuracy back, judge it with the lossy passes before it against the budget: kept
        together, or stepped back together to the model before the first of them."""
        first, before, before_reference = checkpoint
        losses = self.tracker.losses(model)
        line = self.tracker.verdict(losses)
        judged = records[first:]
        if self.tracker.budget.fits(losses):
            self.tracker.spent = losses
            judged[-1].budget = line
            return model, reference
        self.context.invalidate()
        for record in judged:
            if record.status == "applied":
                record.status = "rolled_back"
                record.error = f"over the budget after {judged[-1].name}: stepped back with the passes it recovered"
                record.after = before.stats()
        judged[-1].budget, judged[-1].over_budget = f"{line}: stepped back", True
        return before, before_reference

    def _accepted(self, pass_: Pass, snapshot: Model, model: Model, result: PassResult) -> bool:
        """Whether the pass's result reaches what the pass declared in `acceptance` against `snapshot`, the model
        before it; its verdict's notes and counters join the result, which no longer counts as a change if not."""
        policy = pass_.acceptance()
        if policy is None:
            return True
        verdict = policy.judge(snapshot, model, self.context)
        result.notes = [*result.notes, *verdict.notes]
        result.stats = {**result.stats, **verdict.stats}
        result.changed = verdict.kept
        return verdict.kept

    def _checked(self, pass_: Pass, model: Model, reference: list, snapshot: Model) -> _Step:
        """Run `pass_` with its checks: a composite pass's members checked as the manager's own passes are (when
        there is anything to check), any other pass verified and judged as one step."""
        if not isinstance(pass_, CompositePass) or not (self.verifier or not pass_.checked_whole()):
            return self._step(pass_, model, reference, snapshot)
        if not pass_.checked_whole():
            return self._members_checked_in_rounds(pass_, model, reference)
        return self._composite(pass_, model, reference, snapshot)

    def _composite(self, composite: CompositePass, model: Model, reference: list, snapshot: Model) -> _Step:
        """Run a composite pass whole and verify the result once; if that fails, run its members again from
        `snapshot`, each verified and rolled back on its own (a failing member is retried as its parts when it
        splits, and not run again), so one failing member does not cost the others. The step fails only if no
        member could be kept."""
        whole = self._step(composite, model, reference, snapshot)
        if not whole.error:
            return whole
        return self._members_checked_in_rounds(composite, snapshot.copy(), reference)

    def _members_checked_in_rounds(self, composite: CompositePass, model: Model, reference: list) -> _Step:
        """Run `composite`'s members in rounds until a round changes nothing, each checked as the manager's own
        passes are (verified, judged by its acceptance, rolled back on failure; a composite member likewise), with
        its decisions keyed by its place: round and step within the composite's position."""
        members = composite.members()
        outer = self._position
        outcomes: dict[str, dict[str, Any]] = {}
        totals: dict[str, Any] = {}
        notes: list[str] = []
        layers: list[LayerDecision] = []
        start_reference = reference
        applied = False
        errors: list[str] = []
        for round_number in range(1, composite.options.max_rounds + 1):
            round_changed = False
            queue = list(members)
            step_number = 0
            while queue:
                member = queue.pop(0)
                name = member.describe()
                step_number += 1
                self._position = f"{outer}.{round_number}.{step_number}"
                self.context.begin_pass(self._position, member)
                try:
                    step = self._checked(member, model, reference, model.copy())
                finally:
                    self._position = outer
                    self.context.begin_pass(outer, composite)
                model, reference = step.model, step.reference
                if step.error:
                    parts = member.parts()
                    position = members.index(member)
                    members[position : position + 1] = parts  # later rounds run its parts in its place
                    queue[:0] = parts
                    outcome = outcomes.setdefault(name, {"name": name, "status": "rolled_back"})
                    outcome["error"] = step.error
                    if parts:
                        notes.append(f"{name} rolled back ({step.error}): its parts are checked one by one")
                    else:
                        notes.append(f"{name} rolled back: {step.error}")
                        errors.append(f"{name}: {step.error}")
                    continue
                if step.result.changed:
                    round_changed = applied = True
                    outcomes.setdefault(name, {"name": name, "error": ""})["status"] = "applied"
                add_counters(totals, step.result.stats)
                notes += step.result.notes
                layers += step.result.layers
            if not round_changed:
                break
        max_rel = compare_outputs(start_reference, reference).max_rel if applied and self.verifier else None
        result = PassResult(changed=applied, stats=totals, notes=notes, layers=layers)
        error = "" if applied or not errors else "; ".join(errors)
        return _Step(model, reference, result, error, max_rel, list(outcomes.values()))


@dataclass
class _Step:
    """The outcome of running (and verifying) one pass: the model to go on with, the reference outputs to check
    the next pass against, the pass's result (None if it raised), why it failed, and its members' outcomes."""

    model: Model
    reference: list
    result: PassResult | None
    error: str = ""
    max_rel_error: float | None = None
    members: list[dict[str, Any]] = field(default_factory=list)
    budget: str = ""
    over_budget: bool = False


def _lossy_leaves(pass_: Pass) -> int:
    """How many lossy passes that spend the budget `pass_` is or holds (a composite's members counted)."""
    if isinstance(pass_, CompositePass):
        return sum(_lossy_leaves(member) for member in pass_.members())
    return int(not pass_.lossless and not pass_.recovers)


def _where(exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return f"{last.filename}:{last.lineno}" if last else "unknown location"
