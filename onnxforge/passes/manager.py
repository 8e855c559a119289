"""Runs passes in order, records what each changed and cost, verifies each, and rolls back failures."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from onnxforge.errors import OnnxforgeError, PassUsageError
from onnxforge.ir import Model, ModelStats
from onnxforge.limits import TimeLimitError, check_deadlines, time_limit
from onnxforge.passes.base import Pass, PassContext, PassResult
from onnxforge.passes.verifier import Verifier, VerifyOptions

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
    lossless passes). A failing or crashing pass is rolled back and the run continues, or with
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
            self.context.begin_pass(index, pass_)
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
        try:
            result = pass_.run(model, self.context)
            error = "" if isinstance(result, PassResult) else f"returned {type(result).__name__}, not PassResult"
        except PassUsageError:
            raise
        except OnnxforgeError as exc:
            result, error = None, str(exc)
        except Exception as exc:  # a crashing pass is reported and rolled back like a breaking one
            result, error = None, f"crashed: {type(exc).__name__}: {exc} ({_where(exc)})"
        seconds = time.perf_counter() - start
        if not error and not result.changed and model.stats() != before:
            # The pass changed the model without saying so: verify it all the same.
            result.changed = True
            result.stats = {**result.stats, "unreported_change": True}
        record = PassRecord(pass_.describe(), "unchanged", seconds, before, before)
        if not error:
            record.notes = list(result.notes)
        if not error and result.changed:
            self.context.invalidate(result.preserved)
            record.stats = result.stats
            if self.verifier:
                verdict = self.verifier.check(model, reference, pass_.lossless)
                if verdict.comparison is not None:
                    record.max_rel_error = verdict.comparison.max_rel
                if verdict.ok:
                    reference = verdict.outputs
                else:
                    error = verdict.reason
        elif not error:
            record.stats = result.stats
        if error:
            self.context.invalidate()
            record.error = error
            record.status = "failed" if self.on_error == "stop" else "rolled_back"
            return snapshot, reference, record
        if result.changed:
            record.status = "applied"
            record.after = model.stats()
        return model, reference, record


def _where(exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return f"{last.filename}:{last.lineno}" if last else "unknown location"
