"""How a run shows people it is getting on: bars on a terminal, throttled plain lines elsewhere, nothing with -q.

A progress line that ends in a count, `calibration 12/64` or `distill step 40/300 loss 0.0123` (what follows the
count has no colon: `step 40/300: loss ...` is a line of its own), is a step of a loop: a bar with its count, time
and latest figure on a terminal, at most a line every few seconds in plain lines. Every other line is shown as it
comes.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from onnxforge.ir import Model
from onnxforge.measure import timing_progress
from onnxforge.pipeline import Instrument, Pass, PassRecord

STEP = re.compile(r"(?P<what>.*\S) (?P<done>\d+)/(?P<total>\d+)(?: (?P<figure>[^:]*))?")
# Plain lines: at most one step line this often, so that a long loop shows signs of life without a line per batch.
PLAIN_STEP_INTERVAL_S = 5.0
# A step shorter than this (loading a model) leaves no line behind.
LONG_STEP_S = 1.0


def progress_display(quiet: bool = False, stream: TextIO | None = None) -> ProgressDisplay:
    """The display for `stream` (stderr): nothing when `quiet`, bars when it is a terminal, else plain lines."""
    stream = stream or sys.stderr
    if quiet:
        return ProgressDisplay()
    if stream.isatty():
        return TerminalProgress(stream)
    return ProgressPrinter(stream)


class ProgressDisplay(Instrument):
    """Shows nothing (-q); its subclasses show passes, steps and lines. An instrument of the pass manager, its `line`
    takes the lines of searches and tuning; used as a context manager, timings (measure.timing_progress) report to
    it too, and it ends what it shows when a run stops midway."""

    def __enter__(self) -> ProgressDisplay:
        self._listening = ExitStack()
        self._listening.enter_context(timing_progress(self.line))
        return self

    def __exit__(self, *exc_info) -> None:
        self._listening.close()

    def line(self, text: str) -> None:
        """Show a line on how the run is getting on (a step of a loop when it ends in a count)."""

    def progress(self, line: str) -> None:
        self.line(line)

    @contextmanager
    def loading(self, what: str) -> Iterator[None]:
        """Show that `what` (a model file) is being loaded, inside the display's context or before it."""
        yield


class ProgressPrinter(ProgressDisplay):
    """Plain lines: `[i/n] pass ...` when a pass starts and its status and time when it ends, other lines under it,
    and a loop's steps at most every `interval` seconds (its last one too, once one of it was shown).

    Used as a context manager, it ends the line of a pass that never ended (an error, an interrupt), so that what
    is printed next starts a line of its own.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = PLAIN_STEP_INTERVAL_S):
        self.stream = stream or sys.stderr
        self.interval = interval
        self._line_open = False
        self._in_pass = False
        self._head = ""
        self._written = time.monotonic()  # when the last line was written: steps wait `interval` after it
        self._loop_shown = ""  # the loop (its name) a step line was shown of, which shows its last step too

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        if self._line_open:
            self._write("\n")
            self._line_open = False

    def before_pass(self, index: int, total: int, pass_: Pass, model: Model) -> None:
        self._line_open = self._in_pass = True
        self._head = f"[{index}/{total}] {pass_.describe()} ... "
        self._write(self._head)

    def line(self, text: str) -> None:
        """A line of its own (under the pass's, which is written again when the pass ends); a step only when due."""
        step = STEP.fullmatch(text)
        if step is not None and not self._shows(step):
            return
        self._write(("\n" if self._line_open else "") + ("    " if self._in_pass else "") + f"{text}\n")
        self._line_open = False

    def after_pass(self, index: int, total: int, record: PassRecord) -> None:
        self._write(("" if self._line_open else self._head) + f"{record.status} ({record.seconds:.2f} s)\n")
        self._line_open = self._in_pass = False

    @contextmanager
    def loading(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        if seconds >= LONG_STEP_S:
            self.line(f"loaded {what} ({seconds:.1f} s)")

    def _shows(self, step: re.Match) -> bool:
        done, total = int(step["done"]), int(step["total"])
        last_of_shown = done >= total and self._loop_shown == step["what"]
        if not last_of_shown and time.monotonic() - self._written < self.interval:
            return False
        self._loop_shown = "" if done >= total else step["what"]
        return True

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
        self._written = time.monotonic()


class TerminalProgress(ProgressDisplay):
    """Bars on a terminal (rich): a line per running pass and a bar per running loop, with its count, time and
    latest figure; other lines, and each pass as it ends, printed above them. The bars go when the display ends."""

    def __init__(self, stream: TextIO):
        self.console = Console(file=stream)
        # A few redraws a second from rich's own thread: the runs a timing times never wait on a redraw.
        self.bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[figure]}"),
            console=self.console,
            transient=True,
            refresh_per_second=4,
            redirect_stdout=False,  # stdout may be a pipe (--json, a summary): it is not the terminal's to take
        )
        self._loops: dict[str, tuple[TaskID, int]] = {}  # each running loop's bar and its count so far
        self._pass: TaskID | None = None
        self._head = ""

    def __enter__(self) -> TerminalProgress:
        super().__enter__()
        self.bars.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.bars.stop()
        super().__exit__(*exc_info)

    def before_pass(self, index: int, total: int, pass_: Pass, model: Model) -> None:
        self._head = f"[{index}/{total}] {pass_.describe()}"
        self._pass = self._task(self._head)

    def line(self, text: str) -> None:
        step = STEP.fullmatch(text)
        if step is None:
            self.console.print(("    " if self._pass is not None else "") + text, markup=False, highlight=False)
            return
        what, done, total = step["what"], int(step["done"]), int(step["total"])
        task, so_far = self._loops.get(what, (None, 0))
        if task is not None and done < so_far:  # the same loop again (calibration of the next layer)
            self.bars.remove_task(task)
            task = None
        if task is None:
            task = self._task(what)
        self.bars.update(task, completed=done, total=total, count=f"{done}/{total}", figure=step["figure"] or "")
        if done >= total:
            self.bars.remove_task(task)
            self._loops.pop(what, None)
        else:
            self._loops[what] = (task, done)

    def after_pass(self, index: int, total: int, record: PassRecord) -> None:
        for task, _ in self._loops.values():
            self.bars.remove_task(task)
        self._loops = {}
        if self._pass is not None:
            self.bars.remove_task(self._pass)
            self._pass = None
        self.bars.refresh()  # the line below would otherwise draw the finished pass's bars under it again
        self.console.print(f"{self._head} ... {record.status} ({record.seconds:.2f} s)", markup=False, highlight=False)

    @contextmanager
    def loading(self, what: str) -> Iterator[None]:
        for_the_load_alone = not self.bars.live.is_started  # before the display's own context
        if for_the_load_alone:
            self.bars.start()
        task = self._task(f"loading {what}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.bars.remove_task(task)
            if for_the_load_alone:
                self.bars.stop()
        seconds = time.perf_counter() - start
        if seconds >= LONG_STEP_S:
            self.console.print(f"loaded {what} ({seconds:.1f} s)", markup=False, highlight=False)

    def _task(self, description: str) -> TaskID:
        return self.bars.add_task(description, total=None, count="", figure="")

