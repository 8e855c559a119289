"""Running and timing compiled models on remote boards through TVM's own RPC tracker.

Each board runs `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`; the tracker
(`python -m tvm.exec.rpc_tracker`, which needs tornado) hands a free board of a key to one client at a time.
`prepare_remote` takes one, loads the model there and returns a `TvmPrepared` whose `run` and `measure` work
over the session. `loopback_tracker` starts a tracker and servers on this machine, for tests and trials.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tvm import relax, rpc
from tvm.rpc import base

from onnxforge.backends.tvm.artifact import Signature
from onnxforge.backends.tvm.backend import TvmCompiled, TvmPrepared
from onnxforge.backends.tvm.errors import one_line
from onnxforge.errors import BackendError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TrackerAddress:
    """Where a TVM RPC tracker listens, and the key its servers for one kind of board registered with."""

    host: str
    port: int
    key: str

    def __post_init__(self) -> None:
        if not self.host or not 0 < self.port < 65536 or not self.key or self.key != "".join(self.key.split()):
            raise BackendError(f"an RPC tracker needs a host, a port and a key without spaces, got {self}")

    @classmethod
    def parse(cls, text: str) -> TrackerAddress:
        """The address written as `HOST:PORT:KEY` (`10.0.0.5:9190:rasp4`, `[::1]:9190:rasp4`)."""
        host, port, key = ([""] * 3 + text.rsplit(":", 2))[-3:]
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or not key or key != "".join(key.split()):
            raise BackendError(f"an RPC tracker is written HOST:PORT:KEY (like 127.0.0.1:9190:rasp4), got {text!r}")
        return cls(host, int(port), key)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}:{self.key}"


class RemoteTvmPrepared(TvmPrepared):
    """A model loaded on a board through the tracker; the board stays taken for as long as this object lives."""

    def __init__(self, vm, device, signature: Signature, session: rpc.RPCSession, tracker: TrackerAddress) -> None:
        super().__init__(vm, device, signature)
        self.session, self.tracker = session, tracker

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on the board and return its outputs by name.

        Through the VM's stateful calls: a tuple that `main` returns (several outputs) would come back over RPC
        as an opaque remote object, while `get_output` fetches its tensors one by one. (Not `vm.get_outputs`: its
        recursive closure holds the VM, and so the board, until the garbage collector runs.)
        """
        arguments = self.arguments(inputs)
        module = self.vm.module
        try:
            self.vm.set_input("main", *arguments)
            self.vm.invoke_stateful("main")
            get_output, arity = module["get_output"], module["get_output_arity"]("main")
            result = [get_output("main", i) for i in range(arity)] if arity >= 0 else [get_output("main")]
        except Exception as exc:
            raise BackendError(f"TVM cannot run the model on {self.tracker}: {one_line(exc)}") from exc
        outputs = dict(zip(self.output_names, result))
        for name, value in outputs.items():
            if not hasattr(value, "numpy"):  # a Shape: TVM computed the output from the static shapes alone
                raise BackendError(
                    f"output '{name}' is a shape known before the run, which cannot be fetched over RPC; "
                    "fold it into a constant first (the cleanup pass)"
                )
        return {name: value.numpy() for name, value in outputs.items()}


def prepare_remote(compiled: TvmCompiled, tracker: TrackerAddress, timeout_s: float = 60) -> RemoteTvmPrepared:
    """Load `compiled` on a free board of `tracker.key`, waiting at most `timeout_s` for one to be free.

    BackendError when no tracker answers, no board of the key is free in time, or the board cannot load the
    model (built for another machine, no CUDA GPU there).
    """
    with tempfile.TemporaryDirectory(prefix="onnxforge-rpc-") as folder:
        library, _ = compiled.export(Path(folder) / "model.so")  # before taking a board: linking may take a while
        session = request_session(tracker, timeout_s)
        device = session.cuda(0) if compiled.target.device == "cuda" else session.cpu(0)
        try:
            if not device.exist:
                raise BackendError(f"the board {tracker} gave has no {compiled.target.device} device")
            session.upload(str(library))
            vm = relax.VirtualMachine(session.load_module(library.name), device)
        except BackendError:
            raise
        except Exception as exc:  # TVM's own error types, raised on the board and carried back
            raise BackendError(f"the board {tracker} gave cannot load the model: {one_line(exc)}") from exc
    return RemoteTvmPrepared(vm, device, compiled.signature, session, tracker)


def request_session(tracker: TrackerAddress, timeout_s: float = 60) -> rpc.RPCSession:
    """A session on a free server of `tracker.key`, waiting at most `timeout_s` for one to be free."""
    deadline = time.monotonic() + timeout_s
    with _tracker_connection(tracker, timeout_s) as sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            base.sendjson(sock, [base.TrackerCode.REQUEST, tracker.key, "", 1])
            reply = base.recvjson(sock)
        except TimeoutError:  # TVM's TrackerSession would wait forever: the tracker queues the request
            raise BackendError(
                f"no RPC server of key {tracker.key!r} became free at {tracker} within {timeout_s:g} s; "
                f"see python -m tvm.exec.query_rpc_tracker --host {tracker.host} --port {tracker.port}"
            ) from None
        except OSError as exc:
            raise BackendError(f"the RPC tracker at {tracker} dropped the request: {exc}") from exc
    if reply[0] != base.TrackerCode.SUCCESS:
        raise BackendError(f"the RPC tracker at {tracker} refused the request: {reply!r}")
    host, port, match_key = reply[1]
    try:
        return rpc.connect(host, port, match_key)
    except Exception as exc:
        raise BackendError(f"cannot reach the RPC server {host}:{port} that {tracker} gave: {one_line(exc)}") from exc


def free_servers(tracker: TrackerAddress, timeout_s: float = 5) -> int:
    """How many servers of `tracker.key` the tracker has free now."""
    with _tracker_connection(tracker, timeout_s) as sock:
        try:
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            reply = base.recvjson(sock)
        except OSError as exc:
            raise BackendError(f"the RPC tracker at {tracker} gave no summary: {exc}") from exc
    return int(reply[1]["queue_info"].get(tracker.key, {}).get("free", 0))


@contextmanager
def _tracker_connection(tracker: TrackerAddress, timeout_s: float) -> Iterator[socket.socket]:
    """A socket past the tracker's handshake; unlike TVM's client, a refused connection is not retried for 60 s."""
    try:
        sock = socket.create_connection((tracker.host, tracker.port), timeout=timeout_s)
    except OSError as exc:
        raise BackendError(f"no RPC tracker answers at {tracker}: {exc.strerror or exc}") from exc
    with sock:
        try:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        except OSError as exc:
            raise BackendError(f"no RPC tracker answers at {tracker}: {exc}") from exc
        if magic != base.RPC_TRACKER_MAGIC:
            raise BackendError(f"what listens at {tracker} is not a TVM RPC tracker")
        yield sock


@contextmanager
def loopback_tracker(key: str, servers: int = 2, timeout_s: float = 60) -> Iterator[TrackerAddress]:
    """A TVM RPC tracker on 127.0.0.1 with `servers` RPC servers of `key` registered, all stopped on leaving.

    For tests, and for trying remote measuring on one machine. BackendError when tornado (which the tracker
    needs) is missing or they are not all up within `timeout_s`.
    """
    if importlib.util.find_spec("tornado") is None:
        raise BackendError("TVM's RPC tracker needs tornado: pip install tornado")
    tracker_port, *server_ports = _free_ports(1 + servers)
    address = TrackerAddress(LOOPBACK, tracker_port, key)
    deadline = time.monotonic() + timeout_s
    processes: list[_Process] = []
    try:
        processes.append(_Process.start("tvm.exec.rpc_tracker", "--host", LOOPBACK, "--port", str(tracker_port),
                                        "--port-end", str(tracker_port + 1), "--silent"))
        # A server that finds no tracker retries only every 5 s: start the servers once the tracker listens.
        _wait_until(lambda: free_servers(address, 1) >= 0, processes, deadline, "the RPC tracker to listen")
        for port in server_ports:
            processes.append(_Process.start("tvm.exec.rpc_server", "--tracker", f"{LOOPBACK}:{tracker_port}",
                                            "--key", key, "--host", LOOPBACK, "--port", str(port),
                                            "--port-end", str(port + 1), "--silent"))
        _wait_until(lambda: free_servers(address, 1) >= servers, processes, deadline, f"{servers} RPC servers")
        yield address
    finally:
        for process in reversed(processes):
            process.stop()


class _Process:
    """A `python -m MODULE` in a process group of its own: TVM's tracker and servers run their work in child
    processes (tvm.exec.popen_worker, one per session) that outlive their parent, so all are stopped together."""

    def __init__(self, popen: subprocess.Popen, log) -> None:
        self.popen, self.log = popen, log

    @classmethod
    def start(cls, module: str, *args: str) -> _Process:
        log = tempfile.TemporaryFile()
        popen = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(popen, log)

    def failure(self) -> str | None:
        """Why the process ended (the last line it printed), or None while it runs."""
        if self.popen.poll() is None:
            return None
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return f"{self.popen.args[2]} exited: {lines[-1] if lines else f'status {self.popen.returncode}'}"

    def stop(self) -> None:
        # Only while the leader is not yet reaped: then the group id cannot have passed to someone else's group.
        if self.popen.returncode is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()
        self.log.close()


def _wait_until(ready, processes: list[_Process], deadline: float, what: str) -> None:
    while True:
        for process in processes:
            if (failure := process.failure()) is not None:
                raise BackendError(f"loopback RPC tracker: {failure}")
        try:
            if ready():
                return
        except BackendError:
            pass
        if time.monotonic() > deadline:
            raise BackendError(f"loopback RPC tracker: gave up waiting for {what}")
        time.sleep(0.1)


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different (held open together while the system picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
