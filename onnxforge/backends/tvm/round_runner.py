"""A MetaSchedule runner for a GPU on another machine: candidates are measured there, one round at a time.

MetaSchedule builds its candidates here; `RoundRunner` copies each built library into the folder of the open
round, and when the tuning first waits for a result it closes the round: it writes `round.json` (each
candidate's library and argument shapes), packs the folder as `round-NNN.tar.xz` beside it (the libraries
share most of their CUDA source: 512 candidates, 70 MB, pack into about 2 MB), and waits until `results.json`
appears in the folder. Measuring a round is
`measure_candidates.py` on the GPU machine (runtime-only TVM), whose results file is copied back into the round's
folder; the times then reach MetaSchedule as `RunnerResult`s, so that its cost model and database advance as
with a local runner, and the next round opens. With the round-robin task scheduler each round holds one batch of
every task.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

ROUND_FILE = "round.json"
RESULTS_FILE = "results.json"


@derived_object
class RoundRunner(ms.runner.PyRunner):
    """Measures candidates by rounds in `folder` (`round-001/`, ...; numbering goes on after the rounds there);
    `arch` is the GPU's (`sm_90`), `say` receives a line when a round waits for its results."""

    def __init__(self, folder: Path, arch: str, say: Callable[[str], None], poll_s: float = 2.0) -> None:
        super().__init__()
        self.folder, self.arch, self.say, self.poll_s = Path(folder), arch, say, poll_s
        earlier = [int(p.name[6:]) for p in self.folder.glob("round-*") if p.is_dir() and p.name[6:].isdigit()]
        self.number = 1 + max(earlier, default=0)
        self.open: list[dict] = []
        self.results: dict[int, dict] = {}

    def run(self, runner_inputs: list[ms.runner.RunnerInput]) -> list[ms.runner.RunnerFuture]:
        folder = self.round_folder(self.number)
        folder.mkdir(parents=True, exist_ok=True)
        futures = []
        for runner_input in runner_inputs:
            ident = f"c{len(self.open):04d}"
            shutil.copy(runner_input.artifact_path, folder / f"{ident}.so")
            arguments = [arg.as_json()[1:] for arg in runner_input.args_info]  # ["TENSOR", dtype, shape]
            self.open.append({"id": ident, "library": f"{ident}.so", "args": arguments})
            futures.append(RoundFuture(self, self.number, ident))
        return futures

    def round_folder(self, number: int) -> Path:
        return self.folder / f"round-{number:03d}"

    def done(self, number: int) -> bool:
        """Whether round `number`'s results are here (an open round has none)."""
        return number in self.results or (number < self.number and self._results_path(number).exists())

    def result(self, number: int, ident: str) -> ms.runner.RunnerResult:
        """The result of candidate `ident` of round `number`: closes the round if open, then waits for it."""
        if number == self.number:
            self._close()
        if number not in self.results:
            self.results[number] = self._wait(number)
        entry = self.results[number]["candidates"].get(ident, {"error": "not in the round's results"})
        return ms.runner.RunnerResult(entry.get("run_secs"), entry.get("error"))

    def _close(self) -> None:
        folder = self.round_folder(self.number)
        manifest = {"round": self.number, "arch": self.arch, "candidates": self.open}
        temporary = folder / f"{ROUND_FILE}.tmp"
        temporary.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(temporary, folder / ROUND_FILE)
        archive = folder.with_name(f"{folder.name}.tar.xz")
        with tarfile.open(archive, "w:xz", preset=1) as packed:
            packed.add(folder, arcname=folder.name)
        self.say(f"round {self.number}: {len(self.open)} candidates in {archive}; waiting for {RESULTS_FILE} in "
                 f"{folder}")
        self.number, self.open = self.number + 1, []

    def _wait(self, number: int) -> dict:
        path = self._results_path(number)
        while not path.exists():
            time.sleep(self.poll_s)
        time.sleep(self.poll_s)  # a copy in progress: let it finish
        return json.loads(path.read_text())

    def _results_path(self, number: int) -> Path:
        return self.round_folder(number) / RESULTS_FILE


@derived_object
class RoundFuture(ms.runner.PyRunnerFuture):
    """One candidate's result, ready once its round has been measured."""

    def __init__(self, runner: RoundRunner, number: int, ident: str) -> None:
        super().__init__()
        self.runner, self.number, self.ident = runner, number, ident

    def done(self) -> bool:
        return self.runner.done(self.number)

    def result(self) -> ms.runner.RunnerResult:
        return self.runner.result(self.number, self.ident)
