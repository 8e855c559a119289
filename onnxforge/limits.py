"""Time limits: deadlines on a run or a pass, and the registry of the model executions they stop.

A `Deadline` bounds the work done inside `with deadline:`. When it runs out, a timer thread stops every model
execution registered under it (a backend registers a `stop` callable, such as setting onnxruntime's
`RunOptions.terminate`), and, when the deadline was entered on the main thread, interrupts the main thread
with SIGALRM so that `TimeLimitError` is raised at its next Python instruction (a sleep or a wait included).
Code that runs long Python loops calls `check_deadlines()`. A single model execution is bounded even without
a deadline, by `DEFAULT_EXECUTION_TIMEOUT_S` or what `execution_time_limit` sets, so no execution runs forever.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TypeVar

from onnxforge.errors import OnnxforgeError

# Generous enough for any real model's single inference; a Loop with a huge trip count ends after it.
DEFAULT_EXECUTION_TIMEOUT_S = 600.0
# How long a process whose deadline ran out may stay stuck in C code (building a session) before it is ended.
WATCHDOG_GRACE_S = 3.0


class TimeLimitError(OnnxforgeError):
    """A time limit ran out: `--timeout`, `--pass-timeout`, or the bound of a single model execution.

    `deadline` is the Deadline that ran out (None for the bound of one execution).
    """

    def __init__(self, message: str, deadline: Deadline | None = None) -> None:
        super().__init__(message)
        self.deadline = deadline


T = TypeVar("T")

_lock = threading.Lock()
_active: list[Deadline] = []  # entered and not yet left, outermost first
_alarm = {"depth": 0, "previous": None}  # our SIGALRM handler, installed while a main-thread deadline is active
_execution_timeout_s = [DEFAULT_EXECUTION_TIMEOUT_S]  # innermost execution_time_limit last


class Deadline:
    """A limit of `seconds` on the work inside `with deadline:`; `message` says what ran out.

    With `exit_code_if_stuck`, a process whose main thread has not left the block `WATCHDOG_GRACE_S` seconds
    after the deadline (stuck in C code that cannot be stopped) is ended with `error: <message>` on stderr and
    that exit status: the last resort of a command line run, never of a library call.
    """

    def __init__(self, seconds: float, message: str, exit_code_if_stuck: int | None = None) -> None:
        if not seconds > 0:
            raise OnnxforgeError(f"a time limit must be more than 0 seconds, got {seconds}")
        self.seconds = seconds
        self.message = message
        self.exit_code_if_stuck = exit_code_if_stuck
        self.expired = False
        self._executions: dict[int, Callable[[], None]] = {}
        self._left = threading.Event()
        self._timer: threading.Thread | None = None
        self._interrupts_main = False

    def __enter__(self) -> Deadline:
        self._interrupts_main = threading.current_thread() is threading.main_thread()
        if self._interrupts_main:
            _install_alarm_handler()
        with _lock:
            _active.append(self)
        self._timer = threading.Thread(target=self._watch, name="onnxforge-deadline", daemon=True)
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        with _lock:
            self._left.set()
            _active.remove(self)
        if self._interrupts_main:
            _remove_alarm_handler()

    def check(self) -> None:
        """Raise TimeLimitError if this deadline has run out."""
        if self.expired:
            raise TimeLimitError(self.message, self)

    def _watch(self) -> None:
        if self._left.wait(self.seconds):
            return
        # Under the lock: the main thread cannot leave (and put back the previous SIGALRM handler, maybe the
        # default one that ends the process) before the alarm has reached it.
        with _lock:
            if self._left.is_set():
                return
            self.expired = True
            for stop in self._executions.values():
                stop()
            if self._interrupts_main:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
        if self.exit_code_if_stuck is None or self._left.wait(WATCHDOG_GRACE_S):
            return
        with _lock:  # held until the process ends, so the main thread cannot print its own line as well
            if not self._left.is_set():
                sys.stderr.write(f"error: {self.message}\n")
                sys.stderr.flush()
                os._exit(self.exit_code_if_stuck)


def time_limit(
    seconds: float | None, message: str, exit_code_if_stuck: int | None = None
) -> AbstractContextManager[Deadline | None]:
    """A Deadline of `seconds`, or no limit at all (yielding None) when `seconds` is None."""
    if seconds is None:
        return nullcontext()
    return Deadline(seconds, message, exit_code_if_stuck)


def run_time_limit(
    seconds: float | None, exit_code_if_stuck: int | None = None
) -> AbstractContextManager[Deadline | None]:
    """The limit of a whole run (`--timeout`), or none when `seconds` is None."""
    if seconds is None:
        return nullcontext()
    message = f"time limit of {seconds:g} s exceeded: the run was stopped and nothing was written (raise --timeout)"
    return Deadline(seconds, message, exit_code_if_stuck)


def bounded_in_time(function: Callable[..., T]) -> Callable[..., T]:
    """Run calls of `function` under its own keyword arguments `timeout` (the limit of the whole call, see
    `run_time_limit`) and `execution_timeout` (the bound of each model execution in it)."""
    parameters = inspect.signature(function).parameters

    @functools.wraps(function)
    def bounded(*args, **kwargs) -> T:
        timeout = kwargs.get("timeout", parameters["timeout"].default)
        execution_timeout = kwargs.get("execution_timeout", parameters["execution_timeout"].default)
        with run_time_limit(timeout), execution_time_limit(execution_timeout):
            return function(*args, **kwargs)

    return bounded


def check_deadlines() -> None:
    """Raise TimeLimitError for the outermost active deadline that has run out, if any."""
    for deadline in list(_active):
        deadline.check()


@contextmanager
def running_execution(stop: Callable[[], None]) -> Iterator[None]:
    """Register a model execution for the duration of the block: any active deadline that runs out calls
    `stop` (from another thread) to end it. Raises TimeLimitError first if a deadline has already run out."""
    check_deadlines()
    key = id(stop)
    with _lock:
        deadlines = list(_active)
        for deadline in deadlines:
            deadline._executions[key] = stop
    try:
        yield
    finally:
        with _lock:
            for deadline in deadlines:
                deadline._executions.pop(key, None)


@contextmanager
def execution_time_limit(seconds: float) -> Iterator[None]:
    """Bound each single model execution inside the block by `seconds` (DEFAULT_EXECUTION_TIMEOUT_S outside)."""
    if not seconds > 0:
        raise OnnxforgeError(f"the time limit of one model execution must be more than 0 seconds, got {seconds}")
    _execution_timeout_s.append(seconds)
    try:
        yield
    finally:
        _execution_timeout_s.pop()


def execution_timeout_s() -> float:
    """How long a single model execution may run now (see `execution_time_limit`)."""
    return _execution_timeout_s[-1]


def execution_timed_out(seconds: float) -> TimeLimitError:
    """The error for one model execution that ran longer than `seconds` and was stopped."""
    return TimeLimitError(
        f"a single model execution ran longer than {seconds:g} s and was stopped: the model may never end "
        "(a Loop with a huge trip count, say); check the model"
    )


def _install_alarm_handler() -> None:
    if _alarm["depth"] == 0:
        _alarm["previous"] = signal.signal(signal.SIGALRM, _on_alarm)
    _alarm["depth"] += 1


def _remove_alarm_handler() -> None:
    _alarm["depth"] -= 1
    if _alarm["depth"] == 0:
        signal.signal(signal.SIGALRM, _alarm["previous"] or signal.SIG_DFL)


def _on_alarm(signum, frame) -> None:
    # Raised in the main thread wherever it is (the deadline that sent the alarm may have been left since), but
    # not while a deadline is being left: that would skip its bookkeeping; its owner still sees `expired`.
    if frame is None or frame.f_code not in _LEAVING:
        check_deadlines()


_LEAVING = {Deadline.__exit__.__code__, _remove_alarm_handler.__code__}

