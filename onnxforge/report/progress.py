"""A pass-manager instrument that shows progress on a terminal stream."""

from __future__ import annotations

import sys
from typing import TextIO

from onnxforge.ir import Model
from onnxforge.pipeline import Instrument, Pass, PassRecord


class ProgressPrinter(Instrument):
    """Print `[i/n] pass ...` when a pass starts and its status and time when it ends.

    Used as a context manager, it ends the line of a pass that never ended (an error, an interrupt), so that what
    is printed next starts a line of its own.
    """

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._line_open = False
        self._head = ""

    def __enter__(self) -> ProgressPrinter:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def before_pass(self, index: int, total: int, pass_: Pass, model: Model) -> None:
        self._line_open = True
        self._head = f"[{index}/{total}] {pass_.describe()} ... "
        self.stream.write(self._head)
        self.stream.flush()

    def progress(self, line: str) -> None:
        """A line of its own under the pass's, which is written again when the pass ends."""
        self.stream.write(("\n" if self._line_open else "") + f"    {line}\n")
        self.stream.flush()
        self._line_open = False

    def after_pass(self, index: int, total: int, record: PassRecord) -> None:
        self.stream.write(("" if self._line_open else self._head) + f"{record.status} ({record.seconds:.2f} s)\n")
        self.stream.flush()
        self._line_open = False
