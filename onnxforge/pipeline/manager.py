"""Runs passes in order, records what each changed and cost, verifies each, rolls back failures, and steps back
lossy results that miss what their pass declared in `acceptance`."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from onnxforge.comparison import compare_outputs
from onnxforge.errors import OnnxforgeError, PassUsageError
from onnxforge.ir import Model, ModelStats
from onnxforge.limits import TimeLimitError, check_deadlines, time_limit
from onnxforge.pipeline.base import CompositePass, Pass, PassResult, add_counters
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.verifier import Verifier, VerifyOptions

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
    # A composite pass's members that changed the model or were rolled back: name, status ("applied" if it ever
    # applied, else "rolled_back"), error (why it was last rolled back, if it was).
    members: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 6),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "stats": self.stats,
            "error": self.error,
            "max_rel_error_vs_previous": self.max_rel_error,
            "notes": self.notes,
            "members": self.members,
        }


class Instrument:
    """Hooks around every pass (progress display, logging, timing plots) that never change the model."""

    def before_pass(self, index: int, total: int, pass_: Pass, model: Model) -> None:
        pass

    def after_pass(self, index: int, total: int, record: PassRecord) -> None:
        pass


class PassManager:
    """Run a pipeline of passes on a model.

    After each pass that changed the model, the verifier checks it (valid ONNX, loads, same outputs for
    lossless passes), then a lossy pass's declared acceptance (speed, size) is judged against the model before
    it: a result that falls short is stepped back, and the pass recorded unchanged with notes that say why.
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

    def run(self, model: Model, source: str | bytes | None = None) -> tuple[Model, list[PassRecord]]:
        """Apply the passes to a copy of `model`; return the result and one record per pass.

        `source`, the file (path or bytes) `model` was imported from, gives verification its reference outputs.
        """
        current = model.copy()
        reference = self.verifier.reference(current, source) if self.verifier else []
        records = []
        total = len(self.passes)
        for index, pass_ in enumerate(self.passes, start=1):
            check_deadlines()
            for instrument in self.instruments:
                instrument.before_pass(index, total, pass_, current)
            self._position = str(index)
            self.context.begin_pass(self._position, pass_)
            try:
                current, reference, record = self._run_one(pass_, current, reference)
            except PassUsageError as exc:
                stats = current.stats()
                failed = PassRecord(pass_.describe(), "failed", 0.0, stats, stats, error=str(exc))
                for instrument in self.instruments:
                    instrument.after_pass(index, total, failed)
                raise
            records.append(record)
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
        if step.result is not None:
            record.notes = list(step.result.notes)
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
        try:
            result = pass_.run(model, self.context)
            error = "" if isinstance(result, PassResult) else f"returned {type(result).__name__}, not PassResult"
        except PassUsageError:
            raise
        except OnnxforgeError as exc:
            result, error = None, str(exc)
        except Exception as exc:  # a crashing pass is reported and rolled back like a breaking one
            result, error = None, f"crashed: {type(exc).__name__}: {exc} ({_where(exc)})"
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
        outputs, max_rel = reference, None
        if self.verifier:
            verdict = self.verifier.check(model, reference, pass_.lossless)
            max_rel = verdict.comparison.max_rel if verdict.comparison is not None else None
            if not verdict.ok:
                self.context.invalidate()
                return _Step(snapshot, reference, result, verdict.reason, max_rel)
            outputs = verdict.outputs
        if not self._accepted(pass_, snapshot, model, result):
            self.context.invalidate()
            return _Step(snapshot, reference, result)
        return _Step(model, outputs, result, "", max_rel)

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
            if not round_changed:
                break
        max_rel = compare_outputs(start_reference, reference).max_rel if applied and self.verifier else None
        result = PassResult(changed=applied, stats=totals, notes=notes)
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


def _where(exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return f"{last.filename}:{last.lineno}" if last else "unknown location"
