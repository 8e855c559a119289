"""Run the hostile-model corpus through the real commands in one process, and record what each case did.

    python tests/hostile_corpus.py ROOT RESULTS.json [CASE ...]

Each case gets `ROOT/<case>/` (see hostile_models.prepare). Before each command the runner tries to open
`ROOT/.marks/<case>/<step>` (which does not exist), so a trace of the process's file opens (strace) shows
where each command starts, and where the runner's own steps ("prepare", "check") do. Commands run in this process, one after the other (starting Python for each of
the corpus's commands would take minutes); their stdout and stderr are captured at the file-descriptor level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hostile_models import CASES, SECRET, Case, prepare  # noqa: E402

OUTPUT_NAMES = {"model.opt.onnx", "model.opt.onnx.data", "report.json"}
# No case is large: a command that needs more than this (the runner itself takes ~150 MB) built what it must not.
MEMORY_BOUND_MB = 1024


@dataclass
class CommandResult:
    """What one command did with one case."""

    case: str
    command: str
    expect: str
    exit_code: int
    stderr: list[str]
    seconds: float
    peak_rss_mb: float
    problems: list[str] = field(default_factory=list)


def command_line(case: Case, command: str, model: Path, root: Path) -> list[str]:
    """The arguments of `command` on `model`, outputs into `root/out`."""
    if command == "optimize":
        extra = [arg.replace("{model}", str(model.parent)) for arg in case.extra_args]
        out = root / "out"
        return [str(model), "-o", str(out / "model.opt.onnx"), "--report", str(out / "report.json"), *extra]
    if command == "bench":
        return ["bench", str(model), "--warmup", "0", "--repeats", "1", "--min-time", "0.001"]
    return ["compare", str(model), str(model), "--samples", "1"]


def run_command(argv: list[str], optimize: bool, capture: Path) -> int:
    """Run the CLI entry point in this process with fds 1 and 2 sent to `capture`; return its exit code."""
    from onnxforge.cli import main, optimize_main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(capture, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            return (optimize_main if optimize else main)(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def mark(root: Path, case: Case, step: str) -> None:
    """Leave in the trace that `step` ("prepare", "check" or a command) of `case` starts here."""
    with contextlib.suppress(OSError):
        open(root.parent / ".marks" / case.name / step)  # noqa: SIM115 - fails: only the trace of this open matters


def run_case(case: Case, root: Path) -> list[CommandResult]:
    """Prepare `case` under `root` and run each of its commands; check what each left behind."""
    mark(root, case, "prepare")
    model = prepare(case, root)
    before = snapshot(model.parent)
    results = []
    for command in case.commands:
        mark(root, case, command)
        start = time.perf_counter()
        capture = root.parent / ".capture"
        with PeakMemory() as memory:
            code = run_command(command_line(case, command, model, root), command == "optimize", capture)
        seconds = time.perf_counter() - start
        stderr = [line for line in capture.read_text(errors="replace").splitlines() if line.startswith("error")]
        result = CommandResult(case.name, command, case.expect, code, stderr, round(seconds, 3), memory.peak_mb)
        mark(root, case, "check")
        result.problems = problems(case, command, result, root, model, before)
        results.append(result)
        for leftover in (root / "out").iterdir():
            leftover.unlink()
    return results


def problems(case: Case, command: str, result: CommandResult, root: Path, model: Path, before: dict) -> list[str]:
    """Everything wrong with what one command did: exit and message, outputs, leftovers, input changes."""
    found = []
    if result.peak_rss_mb > MEMORY_BOUND_MB:
        found.append(f"peak memory {result.peak_rss_mb:.0f} MB, more than {MEMORY_BOUND_MB} MB")
    outputs = {p.name for p in (root / "out").iterdir()}
    if case.expect == "error":
        if result.exit_code == 0:
            found.append("accepted (exit 0), expected one error line")
        if len(result.stderr) != 1 or not result.stderr[0].startswith("error: "):
            found.append(f"stderr has {len(result.stderr)} error lines, expected one")
        if "internal error" in " ".join(result.stderr):
            found.append("internal error")
        if outputs:
            found.append(f"left outputs: {sorted(outputs)}")
    else:
        if result.exit_code != 0:
            found.append(f"exit {result.exit_code}: {' '.join(result.stderr)[:300]}")
        elif command == "optimize":
            found += check_output(model, root / "out" / "model.opt.onnx")
        unexpected = outputs - OUTPUT_NAMES
        if unexpected:
            found.append(f"unexpected files in the output folder: {sorted(unexpected)}")
    for path in (root / "out").iterdir():
        if SECRET[:32] in path.read_bytes():
            found.append(f"the secret was copied into {path.name}")
    if snapshot(model.parent) != before:
        found.append("the input folder changed")
    leftovers = list(Path(tempfile.gettempdir()).iterdir())
    if leftovers:
        found.append(f"temporary files left: {[p.name for p in leftovers]}")
    return found


def check_output(model: Path, output: Path) -> list[str]:
    """The optimized model must compute what the input computes (onnxruntime, fresh random inputs)."""
    import numpy as np
    import onnxruntime as ort

    if not output.exists():
        return ["exit 0 but no output model"]
    original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    optimized = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    feed = {}
    for spec in optimized.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        feed[spec.name] = rng.standard_normal(shape).astype(np.float32) if "float" in spec.type else np.ones(shape, bool)
    expected, actual = original.run(None, feed), optimized.run(None, feed)
    for want, got in zip(expected, actual):
        if want.shape != got.shape or not np.allclose(want, got, rtol=1e-4, atol=1e-5):
            return ["the output model computes something else than the input"]
    return []


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> content hash (or link target, or kind) of everything in `folder`, without following links."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = "dir" if path.is_dir() else "special"
    return found


class PeakMemory:
    """The largest resident set of this process while the block runs, sampled every few milliseconds (the
    kernel's own peak, VmHWM, cannot be reset everywhere)."""

    def __enter__(self) -> PeakMemory:
        self.peak_mb = resident_mb()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._sampler.join()

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak_mb = max(self.peak_mb, resident_mb())


def resident_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def main(argv: list[str]) -> int:
    root, results_path, *names = argv
    root = Path(root)
    tempfile.tempdir = str(root / "tmp")  # what the commands leave behind in the temporary folder shows here
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir
    cases = [case for case in CASES if not names or case.name in names]
    results = []
    for case in cases:
        results += run_case(case, root / case.name)
    Path(results_path).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
