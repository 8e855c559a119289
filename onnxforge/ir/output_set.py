"""The files one run writes: checked never to be an input, staged beside their targets, renamed into place together."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from onnxforge.errors import OnnxforgeError

# The signals that end a run (SIGALRM: a time limit ran out); while outputs are renamed into place they wait,
# so that a run leaves all of its outputs or none.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


class OutputSet:
    """Outputs written to temporary names beside their targets and renamed into place together by `commit`.

    Used as a context manager: whatever is not committed when the block ends (an error, an interrupt) is removed,
    temporary files and the folders made for them alike. A target that is one of `inputs` (the same real path,
    or the same file under another name) is refused at commit, before anything is renamed.
    """

    def __init__(self, inputs: Iterable[str | os.PathLike] = ()):
        self._inputs = [(_Identity(path), Path(path)) for path in inputs]
        self._files: list[tuple[Path, Path]] = []  # (temporary file, target)
        self._folders: list[tuple[Path, Path]] = []  # (temporary folder, target folder)
        self._made_folders: list[Path] = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    def stage_file(self, target: str | os.PathLike) -> Path:
        """A new empty file beside `target` (with the permissions a new file gets) that `commit` renames to it."""
        target = Path(target)
        self._make_folder(target.parent)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        with signals_deferred():  # recorded and created together, so an interrupt cannot leave it unrecorded
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            self._files.append((temporary, target))
        return temporary

    def stage_folder(self, folder: str | os.PathLike) -> Path:
        """A new empty folder inside `folder` whose files `commit` moves into `folder` (for writers that put
        files of their own choosing beside the one they are given)."""
        folder = Path(folder)
        self._make_folder(folder)
        temporary = folder / f".onnxforge-{secrets.token_hex(8)}.tmp"
        with signals_deferred():
            temporary.mkdir()
            self._folders.append((temporary, folder))
        return temporary

    def commit(self) -> None:
        """Rename every staged file into place, with the signals that end a run held until all are renamed."""
        moves = [*self._files]
        for temporary, folder in self._folders:
            moves.extend((path, folder / path.name) for path in sorted(temporary.iterdir()))
        for _, target in moves:
            identity = _Identity(target)
            source = next((path for known, path in self._inputs if known.same_file(identity)), None)
            if source is not None:
                raise OnnxforgeError(
                    f"{target} would replace the input file {source}: nothing was written; "
                    "choose another path, inputs are never modified"
                )
        with signals_deferred():
            for temporary, target in moves:
                os.replace(temporary, target)
            self._files.clear()
            self._made_folders.clear()
            for temporary, _ in self._folders:
                temporary.rmdir()
            self._folders.clear()

    def discard(self) -> None:
        """Remove every staged file and folder not committed, and the folders made for them."""
        with signals_deferred():
            for temporary, _ in self._files:
                temporary.unlink(missing_ok=True)
            for temporary, _ in self._folders:
                shutil.rmtree(temporary, ignore_errors=True)
            for folder in reversed(self._made_folders):
                try:
                    folder.rmdir()
                except OSError:  # something else was put there meanwhile: keep it
                    pass
            self._files.clear()
            self._folders.clear()
            self._made_folders.clear()

    def _make_folder(self, folder: Path) -> None:
        missing = []
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            with signals_deferred():
                path.mkdir()
                self._made_folders.append(path)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGALRM until the block ends, then deliver them: the block is never cut short.

    The signals are blocked in this thread (pthread_sigmask); and since Python runs signal handlers in the main
    thread whichever thread the kernel hands a signal to (a runtime's worker threads), the handlers only record
    them meanwhile. Outside the main thread, which cannot change handlers, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in handlers.items():
        if handler is not None:  # None: installed outside Python, cannot be restored
            signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a signal that waited in the kernel arrives now
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def check_output_paths(
    inputs: Mapping[str, Iterable[str | os.PathLike]], outputs: Mapping[str, str | os.PathLike | None]
) -> None:
    """Refuse (OnnxforgeError) an output that is an input or another output, a folder, or in a folder that cannot
    be written or made.

    inputs: what each group of input files is ("the input model") -> its files; outputs: the option or file
    that names an output ("-o", "--report") -> its path, None where not given. Two paths are the same file when
    their real paths are (symbolic links followed) or, for files that exist, their device and inode are (hard
    links).
    """
    taken = [(_Identity(path), f"{what} ({path})") for what, paths in inputs.items() for path in paths]
    inputs_end = len(taken)
    for option, path in outputs.items():
        if path is None:
            continue
        identity = _Identity(path)
        for index, (known, name) in enumerate(taken):
            if not known.same_file(identity):
                continue
            if index < inputs_end:
                raise OnnxforgeError(f"{option} {path} is {name}: choose another path, inputs are never modified")
            raise OnnxforgeError(f"{option} {path} is also written by {name}: give each output its own path")
        _check_writable(option, Path(path))
        taken.append((identity, f"{option} ({path})"))


def _check_writable(option: str, path: Path) -> None:
    if path.is_dir():
        raise OnnxforgeError(f"{option} {path} is a folder: give a file path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OnnxforgeError(f"{option} {path}: {folder} is not a folder; give a path in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxforgeError(f"{option} {path}: cannot write in the folder {folder}; choose a writable folder")


class _Identity:
    """A file as the system knows it: its real path, and its device and inode when it exists."""

    def __init__(self, path: str | os.PathLike):
        self.real = os.path.realpath(path)
        try:
            status = os.stat(self.real)
            self.inode: tuple[int, int] | None = (status.st_dev, status.st_ino)
        except OSError:
            self.inode = None

    def same_file(self, other: _Identity) -> bool:
        return self.real == other.real or (self.inode is not None and self.inode == other.inode)
