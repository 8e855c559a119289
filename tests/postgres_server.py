"""A PostgreSQL server for the tests of shared search storage: the session fixture `postgres_url`.

It needs PostgreSQL's server programs (Debian: apt-get install postgresql) and psycopg 3; without them the tests
that use it skip. PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = DATABASE = "onnxforge"
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
SERVER_USER = "postgres"  # the user a server started by root runs as (Debian's package creates it)
START_TIMEOUT_S = 60
LOG_LINES = 30  # of the server's log, in the failure of a server that would not start


def server_programs_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: the newest /usr/lib/postgresql/VERSION/bin (Debian's), else
    pg_ctl's folder on PATH; None where neither holds all three."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda bin_dir: _version(bin_dir.parent.name))
    on_path = shutil.which("pg_ctl")
    # Resolved: a pg_ctl on PATH may be a link into a folder that has initdb and postgres, which PATH lacks.
    candidates = [*reversed(debian), *([Path(on_path).resolve().parent] if on_path else [])]
    return next((folder for folder in candidates if all((folder / name).is_file() for name in SERVER_PROGRAMS)), None)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL postgresql://onnxforge@127.0.0.1:PORT/onnxforge of a server started for this session (trust
    authentication, fsync off, its files in a temporary folder), stopped at the session's end even when tests fail."""
    programs = server_programs_dir()
    if programs is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl, postgres) in /usr/lib/postgresql/*/bin or on "
                    "PATH: apt-get install postgresql")
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg 3 is not installed: pip install psycopg")
    run_as = _server_user_command()
    # Not under pytest's basetemp: as root that folder is closed to the `postgres` user, and its path can be longer
    # than a unix socket's path may be.
    with tempfile.TemporaryDirectory(prefix="onnxforge-pg-") as folder:
        root, port = Path(folder), _free_port()
        data, log = root / "data", root / "server.log"
        if run_as:
            shutil.chown(root, user=SERVER_USER)
        initdb = _run([*run_as, programs / "initdb", "-D", data, "--auth=trust", "-U", USER, "--no-locale",
                       "--encoding=UTF8", "--no-sync"], cwd=root, timeout=120)
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed:\n{_last_lines(initdb.stdout)}", pytrace=False)
        with (data / "postgresql.conf").open("a") as conf:  # in the file rather than on pg_ctl's shell command line
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
                       "fsync = off\n")
        pg_ctl = [*run_as, programs / "pg_ctl", "-D", data]
        try:
            start = _run([*pg_ctl, "start", "-l", log, "-w", "-t", str(START_TIMEOUT_S)], cwd=root,
                         timeout=START_TIMEOUT_S + 30)
            if start.returncode != 0:
                pytest.fail(f"the PostgreSQL server did not start:\n{_last_lines(start.stdout)}\n{_server_log(log)}",
                            pytrace=False)
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres",
                                     autocommit=True) as connection:
                    connection.execute(f"CREATE DATABASE {DATABASE}")
            except psycopg.Error as exc:
                pytest.fail(f"cannot create the database {DATABASE}: {exc}\n{_server_log(log)}", pytrace=False)
            yield f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            # Also after a failed start: pg_ctl may have timed out waiting for a server that does run.
            _run([*pg_ctl, "stop", "-m", "immediate", "-w"], cwd=root, timeout=60)


def _server_user_command() -> list[str]:
    """The command prefix that runs a server program: none, or runuser to the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.skip(f"running as root (PostgreSQL refuses it) and there is no `{SERVER_USER}` user to run the server "
                    "as: apt-get install postgresql")
    if shutil.which("runuser") is None:
        pytest.skip("running as root (PostgreSQL refuses it) and runuser is not installed to run the server as "
                    f"`{SERVER_USER}`")
    return ["runuser", "-u", SERVER_USER, "--"]


def _run(command: list, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`command` run to its end, its output and errors together in .stdout; a timeout is a failed run."""
    try:
        return subprocess.run(list(map(str, command)), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
        return subprocess.CompletedProcess(exc.cmd, returncode=-1, stdout=f"{output}\ntimed out after {timeout} s")


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now: the one the system picks for port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_log(log: Path) -> str:
    """The server log's last lines, headed (the log goes with its temporary folder)."""
    return f"the server's log:\n{_last_lines(log.read_text(errors='replace'))}" if log.exists() else "no server log"


def _last_lines(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_LINES:])


def _version(name: str) -> tuple[int, ...]:
    """The numbers of a version folder's name, to order them: 15 -> (15,), 9.6 -> (9, 6)."""
    return tuple(int(number) for number in re.findall(r"\d+", name))
