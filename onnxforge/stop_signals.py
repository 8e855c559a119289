"""SIGINT and SIGTERM as exceptions that unwind a command, so that its cleanups run, whatever it was doing."""

from __future__ import annotations

import _thread
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived: raised like KeyboardInterrupt, so that the run unwinds through its cleanups."""


def stop_exception(signum: int) -> BaseException:
    """What a stop signal raises: KeyboardInterrupt for SIGINT, Terminated for SIGTERM."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


class StopOnSignals:
    """While a command runs, SIGINT and SIGTERM raise in the main thread (KeyboardInterrupt, Terminated).

    The exception unwinds the run, so `finally` blocks and context managers remove temporary files and folders.
    Raised where Python cannot pass it on (a destructor, a weakref callback: "Exception ignored in ..."), it is
    raised again at the next instruction instead of being lost. Once it is on its way, further signals are
    ignored: they must not cut the cleanup short. Inside `held()` a signal waits until the block ends.
    `restore` puts back the handlers there were (the commands also run inside other programs, tests among them).
    """

    def __init__(self):
        self.received: int | None = None  # the signal that stopped the run
        self.stopping = False
        self._held = False
        self._previous = {}
        self._previous_hook = sys.unraisablehook
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {signum: signal.signal(signum, self._stop) for signum in (signal.SIGINT, signal.SIGTERM)}
            sys.unraisablehook = self._unraisable

    def _stop(self, signum: int, frame) -> None:
        if self.stopping:
            return
        if self.received is None:
            self.received = signum
        if not self._held:
            self.stopping = True
            raise stop_exception(self.received)

    def _unraisable(self, unraisable) -> None:
        if self.received is not None and isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            # From another thread, once this hook has returned: the handler then raises in the main thread's code.
            _thread.start_new_thread(self._raise_again, ())
            return
        self._previous_hook(unraisable)

    def _raise_again(self) -> None:
        time.sleep(0.001)
        self.stopping = False
        _thread.interrupt_main(self.received)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Signals that arrive in the block take effect when it ends."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
            if self.received is not None and not self.stopping:
                self._stop(self.received, None)

    def restore(self) -> None:
        """Ignore further signals from here on, then put back the handlers there were before."""
        self.stopping = True
        for signum, handler in self._previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(signum, handler)
        if self._previous:
            sys.unraisablehook = self._previous_hook
