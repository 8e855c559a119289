"""The ONNX single-operator conformance cases still give their expected outputs after `cleanup,fuse`.

`onnx.backend.test.case.node.collect_testcases` yields every node test of the installed onnx package (1,884
with onnx 1.23): a model with one operator, input data and the expected outputs. Each case is run in
onnxruntime as is and after `onnxforge.optimize(model, "cleanup,fuse", verify=False)`, and compared with the
expected outputs the way the ONNX backend tests compare them (onnx's `Runner.assert_similar_outputs`: same
shapes and dtypes, `assert_allclose` with the case's rtol and atol, 1e-3 and 1e-7 unless a case says
otherwise; strings equal; sequences element by element). Cases onnxruntime already fails as they are
(load, run or wrong output) are excluded; the list, with reasons, is computed here and printed (`pytest -s`).

All cases run once, in one module fixture that shares them out to one process per core: per-case pytest
overhead and collecting the cases at import time would cost more than the checks. Each case is run after `cleanup` and
then after `fuse` on that result (the same as `cleanup,fuse`), so a failure is attributed to the family that
caused it: `fuse` must break nothing that passes after `cleanup`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
import pytest
from onnx import numpy_helper
from onnx.backend.test.case.node import collect_testcases
from onnx.backend.test.case.test_case import TestCase

from onnxforge import optimize


@dataclass
class Outcomes:
    """What became of each case: excluded (the original fails), or failing after cleanup, or after cleanup,fuse."""

    total: int
    excluded: dict[str, str] = field(default_factory=dict)
    after_cleanup: dict[str, str] = field(default_factory=dict)
    after_fuse: dict[str, str] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    rewrites: Counter = field(default_factory=Counter)  # fuse's counters summed over the cases

    @property
    def checked(self) -> int:
        return self.total - len(self.excluded)


@dataclass
class CaseOutcome:
    """One case: why it is excluded, or why it fails after cleanup and after cleanup,fuse; what the passes did."""

    name: str
    excluded: str | None = None
    after_cleanup: str | None = None
    after_fuse: str | None = None
    statuses: Counter = field(default_factory=Counter)
    rewrites: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def outcomes() -> Outcomes:
    with _quiet():
        cases = collect_testcases(None)
    found = Outcomes(total=len(cases))
    # The cases are independent: one process per core checks its share ("spawn": no fork of a threaded process).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        for case in pool.map(_check, cases, chunksize=16):
            for where in ("excluded", "after_cleanup", "after_fuse"):
                if getattr(case, where) is not None:
                    getattr(found, where)[case.name] = getattr(case, where)
            found.statuses.update(case.statuses)
            found.rewrites.update(case.rewrites)
            for note in case.notes:
                print(note)
    print(f"\n{found.total} ONNX node conformance cases; {len(found.excluded)} excluded (onnxruntime fails them):")
    for name, reason in sorted(found.excluded.items()):
        print(f"  excluded {name}: {reason}")
    print(f"{found.checked} checked; pass outcomes: {dict(sorted(found.statuses.items()))}")
    print(f"fuse rewrites over all checked cases: {dict(sorted(found.rewrites.items()))}")
    for name, reason in sorted(found.after_fuse.items()):
        where = "after cleanup" if name in found.after_cleanup else "after fuse"
        print(f"  FAILED {where} {name}: {reason}")
    return found


def test_onnxruntime_runs_most_conformance_cases_as_they_are(outcomes):
    assert outcomes.total > 1000, "fewer conformance cases than expected: is onnx installed fully?"
    assert outcomes.checked > 0.8 * outcomes.total


def test_fuse_breaks_no_conformance_case_that_passes_after_cleanup(outcomes):
    broken = {name: reason for name, reason in outcomes.after_fuse.items() if name not in outcomes.after_cleanup}
    assert not broken, f"{len(broken)} of {outcomes.checked} cases fail after cleanup,fuse only: " + "; ".join(
        f"{name}: {reason}" for name, reason in sorted(broken.items())
    )


# Cases that fail after cleanup because onnxruntime, not the rewrite, is stricter once more is known: these
# expanded AffineGrid functions feed Range 1-element 1-D tensors where ONNX says scalars. onnxruntime lets
# that pass while shapes are unknown; fold-shapes makes the If condition (Size of a graph input) a constant,
# onnxruntime then inlines the branch, knows the shapes, and refuses the model. Each must fail with this reason.
KNOWN_ONNXRUNTIME_LIMITS = {
    "test_affine_grid_2d_expanded": "Input to 'Range' op should be scalars",
    "test_affine_grid_2d_align_corners_expanded": "Input to 'Range' op should be scalars",
}


def test_every_conformance_case_passes_after_cleanup_and_fuse(outcomes):
    failing = {
        name: reason
        for name, reason in outcomes.after_fuse.items()
        if KNOWN_ONNXRUNTIME_LIMITS.get(name, "\0") not in reason
    }
    assert not failing, f"{len(failing)} of {outcomes.checked} cases fail: " + "; ".join(
        f"{name}: {reason}" for name, reason in sorted(failing.items())
    )


def _check(case: TestCase) -> CaseOutcome:
    """Run `case` as it is, after cleanup, and after fuse on that result (the same as "cleanup,fuse", and it tells
    whose failure it is)."""
    with _quiet():
        outcome = CaseOutcome(case.name, excluded=_fails(case.model, case))
        if not outcome.excluded:
            _optimize_and_run(case, outcome)
    return outcome


def _optimize_and_run(case: TestCase, outcome: CaseOutcome) -> None:
    """Record in `outcome` how `case` fares after cleanup, then after fuse on that result."""
    cleaned, reason = case.model, None
    for passes, where in (("cleanup", "after_cleanup"), ("fuse", "after_fuse")):
        try:
            optimized, report = optimize(cleaned, passes, verify=False)
            result = optimized.to_proto()
        except Exception as exc:  # a crash of ours on a valid model: a failure, not an exclusion
            setattr(outcome, where, f"optimize raised {type(exc).__name__}: {_first_line(exc)}")
            break
        outcome.statuses.update(f"{r.name} {r.status}" for r in report.passes)
        if passes == "fuse":
            outcome.rewrites.update({k: v for r in report.passes for k, v in r.stats.items() if v})
        for record in report.passes:
            if record.status == "rolled_back":  # not wrong, but a pass that raised: worth a look
                outcome.notes.append(f"  {case.name}: {record.name} rolled back: {record.error}")
        # fuse leaves most cases byte for byte as cleanup did: those keep cleanup's outcome, not run again
        if passes == "cleanup" or result.SerializeToString() != cleaned.SerializeToString():
            reason = _fails(result, case)
        cleaned = result
        setattr(outcome, where, reason)
    if outcome.after_fuse is None:
        outcome.after_fuse = outcome.after_cleanup


def _fails(model: onnx.ModelProto, case: TestCase) -> str | None:
    """Why onnxruntime does not give `case`'s expected outputs on `model`; None when it does."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        return f"load: {_first_line(exc)}"
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    for inputs, expected in case.data_sets:
        feed = {name: _normalize(value) for name, value in zip(names, inputs)}
        try:
            outputs = session.run(None, feed)
        except Exception as exc:
            return f"run: {_first_line(exc)}"
        if len(outputs) != len(expected):
            return f"wrong output: {len(outputs)} outputs, expected {len(expected)}"
        for index, (want, got) in enumerate(zip(expected, outputs)):
            try:
                _assert_similar(_normalize(want), got, case.rtol, case.atol)
            except AssertionError as exc:
                return f"wrong output {index}: {_first_line(exc)}"
    return None


def _assert_similar(expected, actual, rtol: float, atol: float) -> None:
    """onnx's Runner.assert_similar_outputs for one output, with sequences and empty optionals compared whole."""
    if expected is None or actual is None:
        assert expected is None and actual is None, f"expected {expected!r}, got {actual!r}"
        return
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), "sequences differ in type or length"
        for want, got in zip(expected, actual):
            _assert_similar(want, got, rtol, atol)
        return
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    if expected.dtype == object:
        np.testing.assert_array_equal(actual, expected)
        return
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype}, expected {expected.dtype}"
    if expected.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)  # two bfloat16 ULPs, as the ONNX runner allows
        actual, expected = actual.astype(np.float32), expected.astype(np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def _normalize(value):
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the case generators' numpy warnings, onnxruntime's kernel errors and graphsurgeon's notes."""
    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    onnxruntime.set_default_logger_severity(4)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnxruntime.set_default_logger_severity(2)
        gs.logger.G_LOGGER.severity = severity
