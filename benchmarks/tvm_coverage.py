"""Run every ONNX single-operator conformance case through onnxforge's TVM backend and tabulate what passes.

    python benchmarks/tvm_coverage.py                                   # about 2 minutes on 2 cores
    python benchmarks/tvm_coverage.py --only test_relu,test_shape       # a few cases, printed, nothing written

Each case of `onnx.backend.test.case.node.collect_testcases()` (a model of one operator, or of the function it
expands to, with input data and expected outputs) is compiled by `get_backend("tvm").prepare(model,
BackendOptions(threads=1))`, run on each of its data sets, and its outputs compared the way onnx's backend test
Runner compares them (`Runner.assert_similar_outputs`: same count, shapes and dtypes, then `assert_allclose` with
the case's rtol and atol, 1e-3 and 1e-7 unless the case says otherwise). One long-lived worker process compiles
and runs the cases, so that a TVM crash or hang costs one case and not the run: the worker is restarted after a
crash, and killed and restarted when a case takes longer than --timeout seconds.

Writes docs/tvm-coverage.md (totals, the commonest failure reasons, a table per operator) and
benchmarks/results/tvm_coverage.json (every case's category and reason).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.test.case.node import collect_testcases
from onnx.backend.test.case.test_case import TestCase

from onnxforge.backends import Backend, BackendOptions, get_backend
from onnxforge.errors import BackendError

ROOT = Path(__file__).resolve().parent.parent
JSON_PATH = ROOT / "benchmarks" / "results" / "tvm_coverage.json"
MARKDOWN_PATH = ROOT / "docs" / "tvm-coverage.md"
COMMAND = "python benchmarks/tvm_coverage.py"

PASS = "pass"
IMPORT_UNSUPPORTED = "import-unsupported"
COMPILE_ERROR = "compile-error"
RUN_ERROR = "run-error"
WRONG_OUTPUT = "wrong-output"
SKIPPED = "skipped-input-types"
CRASHED = "crashed"
TIMEOUT = "timeout"
CATEGORIES = {
    PASS: "compiled, ran, and gave the expected outputs",
    IMPORT_UNSUPPORTED: "an op TVM's ONNX importer does not convert (the backend refuses it before importing)",
    COMPILE_ERROR: "TVM's import or compilation of the model failed",
    RUN_ERROR: "compiled, but running it on TVM's VM failed",
    WRONG_OUTPUT: "ran, but an output differs in count, shape, dtype or value beyond the case's tolerance",
    SKIPPED: "an input the backend cannot feed (a sequence, an optional or a string tensor): not run",
    CRASHED: "the worker process died during the case",
    TIMEOUT: "the case took longer than the per-case time limit",
}
IMPORTER_REFUSAL = "TVM's ONNX importer does not support"  # the backend's message for ops it will not import
EXPANDED = re.compile(r"(.+)_expanded(?:_ver\d+)?")  # onnx names a function's expanded case after the op's case
NOT_BACKEND_ERROR = "(not a BackendError)"


@dataclass(frozen=True)
class Outcome:
    """What became of one case: its category (one of CATEGORIES) and why, the first line of the error."""

    category: str
    reason: str = ""


@dataclass(frozen=True)
class CaseResult:
    """One case's outcome, with the operator it tests and how long it took (seconds, worker start excluded)."""

    name: str
    op: str
    category: str
    reason: str
    seconds: float


def classify(case: TestCase, backend: Backend, stage: Callable[[str], None] = lambda _: None) -> Outcome:
    """Compile and run `case` on `backend` and compare its outputs; `stage` is told "compiling", then "running"."""
    unfeedable = unfeedable_inputs(case.model)
    if unfeedable:
        return Outcome(SKIPPED, f"cannot feed {', '.join(unfeedable)}")
    stage("compiling")
    try:
        prepared = backend.prepare(case.model, BackendOptions(threads=1))
    except BackendError as exc:
        return Outcome(IMPORT_UNSUPPORTED if IMPORTER_REFUSAL in str(exc) else COMPILE_ERROR, _first_line(exc))
    except Exception as exc:  # the backend should have said BackendError: worth a report of its own
        return Outcome(COMPILE_ERROR, f"{type(exc).__name__} {NOT_BACKEND_ERROR}: {_first_line(exc)}")
    stage("running")
    for inputs, expected in case.data_sets:
        feed = dict(zip(prepared.input_names, (_array(value) for value in inputs)))
        try:
            outputs = prepared.run(feed)
        except BackendError as exc:
            return Outcome(RUN_ERROR, _first_line(exc))
        except Exception as exc:
            return Outcome(RUN_ERROR, f"{type(exc).__name__} {NOT_BACKEND_ERROR}: {_first_line(exc)}")
        mismatch = output_mismatch([_array(value) for value in expected], list(outputs.values()), case.rtol, case.atol)
        if mismatch:
            return Outcome(WRONG_OUTPUT, mismatch)
    return Outcome(PASS)


def unfeedable_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph inputs the backend cannot be given (it feeds numeric tensors only), each with its kind."""
    initializers = {t.name for t in model.graph.initializer}
    found = []
    for value in model.graph.input:
        kind = value.type.WhichOneof("value")
        if value.name in initializers:
            continue
        if kind != "tensor_type":
            found.append(f"{kind.removesuffix('_type')} input '{value.name}'")
        elif value.type.tensor_type.elem_type == onnx.TensorProto.STRING:
            found.append(f"string input '{value.name}'")
    return found


def output_mismatch(expected: list, actual: list, rtol: float, atol: float) -> str | None:
    """How `actual` differs from `expected` by the rules of onnx's Runner.assert_similar_outputs; None if alike."""
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for index, (want, got) in enumerate(zip(expected, actual)):
        if isinstance(want, list) or want is None:  # sequences and optionals: the backend returns tensors only
            return f"output {index}: a {type(got).__name__}, expected a {type(want).__name__}"
        got = np.asarray(got)
        if got.shape != want.shape:
            return f"output {index}: shape {got.shape}, expected {want.shape}"
        if got.dtype != want.dtype:
            return f"output {index}: dtype {got.dtype}, expected {want.dtype}"
        tolerance = rtol
        if want.dtype.name == "bfloat16":  # two bfloat16 ULPs, as the Runner allows
            tolerance, got, want = max(rtol, 2**-6), got.astype(np.float32), want.astype(np.float32)
        try:
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=atol)
        except AssertionError as exc:
            return f"output {index}: {_mismatch_summary(exc)}"
        except TypeError as exc:  # numpy cannot compare the dtype (float8 and friends): neither can the Runner
            return f"output {index}: cannot compare {want.dtype}: {_first_line(exc)}"
    return None


def case_ops(cases: list[TestCase]) -> dict[str, str]:
    """The operator each case tests: its node's op, or for a function's expanded case "<op> (expanded)"."""
    single = {case.name: _op_name(case.model.graph.node[0]) for case in cases if len(case.model.graph.node) == 1}
    ops = {}
    for case in cases:
        match = EXPANDED.fullmatch(case.name)
        if match and match.group(1) in single:
            ops[case.name] = f"{single[match.group(1)]} (expanded)"
        elif case.name in single:
            ops[case.name] = single[case.name]
        else:
            ops[case.name] = "+".join(sorted({_op_name(node) for node in case.model.graph.node})) or "(no nodes)"
    return ops


class Worker:
    """A long-lived process that classifies the cases sent to it, restarted after it crashes or hangs.

    Its stdout and stderr (TVM's C++ warnings, the importer's prints) go to a log file; when it dies, the last
    line it wrote for the case becomes part of the reason. `backend` is the onnxforge backend it prepares with.
    """

    start_timeout_s = 300.0

    def __init__(self, log_path: Path, backend: str = "tvm") -> None:
        self.log_path, self.backend = log_path, backend
        self.starts = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def classify(self, case: TestCase, timeout_s: float) -> Outcome:
        """The worker's outcome for `case`, or CRASHED or TIMEOUT (the worker then stopped, to start afresh)."""
        if self._process is not None and not self._process.is_alive():  # died between cases (out of memory?)
            self.stop()
        self.start()
        log_offset = self.log_path.stat().st_size
        self._connection.send(case)
        deadline, stage = time.monotonic() + timeout_s, "receiving the case"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                return Outcome(TIMEOUT, f"no result after {timeout_s:.0f} s, while {stage}")
            try:
                if not self._connection.poll(min(remaining, 1.0)):
                    continue
                kind, payload = self._connection.recv()
            except (EOFError, OSError):  # the worker died: poll says "ready" at end of file, recv raises
                return self._crashed(stage, log_offset)
            if kind == "done":
                return payload
            stage = payload

    def _crashed(self, stage: str, log_offset: int) -> Outcome:
        self._process.join(timeout=10)
        code = self._process.exitcode
        self.stop()
        last = _last_line(self.log_path, log_offset)
        return Outcome(CRASHED, f"crashed ({_exit_description(code)}) while {stage}" + (f": {last}" if last else ""))

    def stop(self) -> None:
        """End the worker process (ours), if one is running."""
        if self._process is None:
            return
        self._connection.close()
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._process = self._connection = None

    def start(self) -> None:
        """Start the worker process unless it is running, and wait until it has loaded the backend."""
        if self._process is not None:
            return
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of TVM's state carried over
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.backend, str(self.log_path)), daemon=True)
        self._process.start()
        child.close()
        self.starts += 1
        if not self._connection.poll(self.start_timeout_s):
            self.stop()
            raise RuntimeError(f"the worker did not start in {self.start_timeout_s:.0f} s; see {self.log_path}")
        try:
            self._connection.recv()  # ("ready", None): the backend is loaded
        except EOFError:
            self.stop()
            raise RuntimeError(f"the worker died while starting; see {self.log_path}") from None


def _serve(connection, backend_name: str, log_path: str) -> None:
    """The worker's loop: classify each case received until the parent closes the connection."""
    # BackendOptions.threads only sets the target's num-cores (read by MetaSchedule); TVM's runtime thread pool
    # reads this variable, and the machine is shared.
    os.environ["TVM_NUM_THREADS"] = "1"
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log, 1)
    os.dup2(log, 2)
    with quiet():
        backend = get_backend(backend_name)
    connection.send(("ready", None))
    while True:
        try:
            case = connection.recv()
        except EOFError:
            return
        print(f"--- {case.name}", flush=True)
        with quiet():
            try:
                outcome = classify(case, backend, lambda stage: connection.send(("stage", stage)))
            except Exception as exc:  # a bug of this script, not of the backend: say so, and go on
                outcome = Outcome(CRASHED, f"the classifier raised {type(exc).__name__}: {_first_line(exc)}")
        connection.send(("done", outcome))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the case generators' numpy warnings and the importer's Python warnings."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


Progress = Callable[[int, CaseResult], None]


def run_cases(
    cases: list[TestCase], ops: dict[str, str], timeout_s: float, log_path: Path, progress: Progress | None = None
) -> tuple[list[CaseResult], Worker]:
    """Classify `cases` in one worker process; their results, and the (stopped) worker, which counted its starts."""
    results = []
    with Worker(log_path) as worker:
        for index, case in enumerate(cases, 1):
            worker.start()  # a restart after a crash is not the next case's time
            started = time.monotonic()
            outcome = worker.classify(case, timeout_s)
            result = CaseResult(case.name, ops[case.name], outcome.category, outcome.reason,
                                round(time.monotonic() - started, 3))
            results.append(result)
            if progress:
                progress(index, result)
    return results, worker


def write_json(results: list[CaseResult], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "totals": dict(Counter(r.category for r in results)),
                "cases": [asdict(result) for result in results]}
    path.write_text(json.dumps(document, indent=1) + "\n")


def write_markdown(results: list[CaseResult], meta: dict, path: Path) -> None:
    """The coverage page: what was run, totals by category, the commonest failure reasons, a row per operator."""
    totals = Counter(result.category for result in results)
    passed, total = totals[PASS], len(results)
    tried = total - totals[SKIPPED]
    lines = [
        "# TVM backend: ONNX operator conformance coverage",
        "",
        f"Every single-operator conformance case of onnx {meta['onnx']} (`onnx.backend.test.case.node."
        f"collect_testcases()`: {total} cases, each a model of one operator, or of the function it expands to, with "
        "inputs and expected outputs), run through onnxforge's TVM backend:",
        "",
        f"- compiled by `get_backend(\"tvm\").prepare(model, BackendOptions(threads=1))`: apache-tvm {meta['tvm']}, "
        "Relax ONNX import, `DecomposeOpsForInference`, LLVM for the host CPU, TVM's default schedules;",
        "- run on TVM's VM (`TVM_NUM_THREADS=1`) with the case's inputs, and its outputs compared as onnx's backend "
        "test Runner compares them: the same count, shapes and dtypes, then `assert_allclose` with the case's "
        "rtol and atol (1e-3 and 1e-7 unless the case says otherwise);",
        "- one long-lived worker process compiled and ran the cases, restarted after a crash; a case over "
        f"{meta['timeout_s']:.0f} s counts as a timeout.",
        "",
        f"Run {meta['date']} on {meta['machine']} (load average {meta['load_average']}, at start and end); "
        f"it took {meta['elapsed_s'] / 60:.1f} minutes, and the worker started {meta['worker_starts']} time(s). "
        "To repeat it:",
        "",
        "```",
        COMMAND,
        "```",
        "",
        f"Every case's category and reason: `{JSON_PATH.relative_to(ROOT)}`.",
        "",
        "## Totals",
        "",
        f"**{passed} of {total} cases pass** ({_percent(passed, total)}); {passed} of the {tried} cases the "
        f"backend can be fed ({_percent(passed, tried)}).",
        "",
        "| category | cases | meaning |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {totals[name]} | {meaning} |" for name, meaning in CATEGORIES.items() if totals[name]]
    failing = [r for r in results if r.category not in (PASS, SKIPPED)]
    reasons = Counter((r.category, _reason_kind(r)) for r in failing)
    lines += [
        "",
        "## Commonest failure reasons",
        "",
        "Failing cases grouped by category and reason; a reason's details in parentheses (shapes, sizes, "
        "numbers) are written `(...)`, values that differ are one reason whatever the numbers.",
        "",
        "| category | reason | cases |",
        "|---|---|---:|",
    ]
    lines += [f"| {kind} | {_cell(reason, 140)} | {count} |" for (kind, reason), count in reasons.most_common(20)]
    if len(reasons) > 20:
        rest = sum(reasons.values()) - sum(count for _, count in reasons.most_common(20))
        lines.append(f"| | {len(reasons) - 20} other reasons | {rest} |")
    lines += _operator_table(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _operator_table(results: list[CaseResult]) -> list[str]:
    by_op: dict[str, list[CaseResult]] = defaultdict(list)
    for result in results:
        by_op[result.op].append(result)
    lines = [
        "",
        "## By operator",
        "",
        "A function's expanded cases (the function body in primitive ops) have a row of their own, "
        "`<op> (expanded)`. For an operator with failing cases: the reasons, commonest first, with how many cases "
        "gave each.",
        "",
        "| op | cases | passed | why the others did not pass |",
        "|---|---:|---:|---|",
    ]
    for op in sorted(by_op, key=str.lower):
        cases = by_op[op]
        passed = sum(result.category == PASS for result in cases)
        reasons = Counter(f"{r.category}: {_reason_kind(r)}" for r in cases if r.category != PASS).most_common()
        why = "; ".join(f"{_cell(reason, 110)} ({count})" for reason, count in reasons[:2])
        if len(reasons) > 2:
            why += f"; {len(reasons) - 2} other reason(s)"
        lines.append(f"| {op} | {len(cases)} | {passed} | {why} |")
    return lines


def _reason_kind(result: CaseResult) -> str:
    """The reason without what is particular to the case (numbers, shapes, input names), to group cases by."""
    if result.category == WRONG_OUTPUT and "Not equal to tolerance" in result.reason:
        return "values differ beyond the tolerance"
    if result.category == SKIPPED:
        kinds = {part.split(" input")[0] for part in result.reason.removeprefix("cannot feed ").split(", ")}
        return ", ".join(f"{kind} input" for kind in sorted(kinds))
    return " ".join(_collapse_details(result.reason).split())


def _collapse_details(text: str) -> str:
    """`text` with each parenthesized part that holds a number or nested parentheses written as (...)."""
    kept_open, kept_close, collapsed = "\x00", "\x01", "\x02"  # stand-ins until every group is done

    def innermost(match: re.Match) -> str:
        inside = match.group(1)
        if re.search(r"\d", inside) or kept_open in inside or collapsed in inside:
            return collapsed
        return kept_open + inside + kept_close

    while True:
        shorter = re.sub(r"\(([^()]*)\)", innermost, text)
        if shorter == text:
            return text.replace(kept_open, "(").replace(kept_close, ")").replace(collapsed, "(...)")
        text = shorter


def _cell(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _array(value):
    """A case's input or expected output as the backend takes it: TensorProtos and numpy scalars as arrays."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_array(item) for item in value]
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def _mismatch_summary(exc: AssertionError) -> str:
    """assert_allclose's tolerance line and its mismatch and largest-error lines, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if line.startswith(("Not equal", "Mismatched", "Max absolute", "Max relative"))]
    return "; ".join(kept or lines[:1])[:300]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _last_line(path: Path, offset: int) -> str:
    with path.open("rb") as log:
        log.seek(offset)
        lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if len(lines) > 1 else ""  # the first line is the worker's own "--- case" marker


def _exit_description(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
        return f"signal {-code}"
    return f"exit code {code}"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names: run these, print them, write nothing")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one case may take (default 120)")
    args = parser.parse_args(argv)

    started, date = time.monotonic(), datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_at_start = os.getloadavg()[0]
    with quiet():
        cases = collect_testcases(None)
    ops = case_ops(cases)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {case.name for case in cases}
        if unknown:
            parser.error(f"no such case(s): {', '.join(sorted(unknown))}")
        cases = [case for case in cases if case.name in names]

    def progress(index: int, result: CaseResult) -> None:
        if args.only or result.category in (CRASHED, TIMEOUT):
            print(f"{result.name}: {result.category} {result.reason} ({result.seconds:.2f} s)", flush=True)
        if index % 100 == 0 or index == len(cases):
            print(f"{index}/{len(cases)} cases, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "worker.log"
        log_path.touch()
        results, worker = run_cases(cases, ops, args.timeout, log_path, progress)
    if args.only:
        return 0
    meta = {
        "command": COMMAND,
        "date": date,
        "machine": _machine(),
        "onnx": onnx.__version__,
        "tvm": importlib.metadata.version("apache-tvm"),
        "backend_options": "BackendOptions(threads=1), TVM_NUM_THREADS=1",
        "timeout_s": args.timeout,
        "worker_starts": worker.starts,
        "elapsed_s": round(time.monotonic() - started, 1),
        "load_average": f"{load_at_start:.2f} and {os.getloadavg()[0]:.2f}",
    }
    write_json(results, meta, JSON_PATH)
    write_markdown(results, meta, MARKDOWN_PATH)
    totals = Counter(result.category for result in results)
    print(f"{totals[PASS]} of {len(results)} cases pass; {dict(totals.most_common())}")
    print(f"{meta['elapsed_s'] / 60:.1f} minutes, the worker started {worker.starts} time(s)")
    print(f"wrote {MARKDOWN_PATH.relative_to(ROOT)} and {JSON_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
