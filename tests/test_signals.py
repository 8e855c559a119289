"""SIGINT and SIGTERM at any moment of `optimize`: one `error:` line, exit 130 / 143, nothing left behind."""

import os
import signal
import subprocess
import time
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_cli import OPTIMIZE

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status (Linux)")

EXPECTED = {signal.SIGINT: (130, "error: interrupted"), signal.SIGTERM: (143, "error: terminated")}
# Cleanup finds nothing to do after the first round; 60 rounds keep the run busy for a few seconds.
PASSES = ",".join(["cleanup"] * 60)


def _chain(folder: Path, layers: int = 100, width: int = 64) -> Path:
    """x -> (MatMul by W_i, then Identity) x layers, the weights in an external data file."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Identity", [f"h{i}"], [f"c{i}"]))
        previous = f"c{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=weights,
    )
    path = folder / "chain.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(path), save_as_external_data=True, location="chain.onnx.data", size_threshold=0,
    )  # fmt: skip
    return path


def _handlers_installed(pid: int) -> bool:
    """Whether the process catches SIGTERM (Python itself catches only SIGINT): onnxforge's handlers are in place."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


class Run:
    """`optimize` on a model that takes a few seconds, in its own TMPDIR, started in `tmp_path`."""

    def __init__(self, tmp_path: Path, quiet: bool = True):
        self.folder = tmp_path
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        self.out = tmp_path / "out"
        self.model = _chain(tmp_path)
        self.inputs = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        env = {k: v for k, v in os.environ.items() if k != "ONNXFORGE_DEBUG"} | {"TMPDIR": str(self.tmpdir)}
        outputs = ["-o", self.out / "m.onnx", "--report", self.out / "r.json"]
        command = [*OPTIMIZE, self.model, "--passes", PASSES, *outputs]
        self.process = subprocess.Popen(
            [*map(str, command), *(["-q"] if quiet else [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.stderr = b""

    def wait_for_handlers(self) -> None:
        deadline = time.monotonic() + 60
        while not _handlers_installed(self.process.pid):
            assert self.process.poll() is None and time.monotonic() < deadline, "the command never installed handlers"
            time.sleep(0.002)

    def wait_for_first_pass(self) -> None:
        """Read stderr until the first pass has started (its progress line `[1/60] cleanup ... ` appears)."""
        while b"[1/" not in self.stderr:
            chunk = os.read(self.process.stderr.fileno(), 256)
            assert chunk, f"the command ended before its first pass: {self.stderr!r}"
            self.stderr += chunk

    def finish(self) -> tuple[int, list[str]]:
        _, rest = self.process.communicate(timeout=120)
        return self.process.returncode, (self.stderr + rest).decode().splitlines()

    def check_nothing_left_behind(self) -> None:
        leftovers = [p for p in self.folder.rglob("*") if ".tmp" in p.name and p != self.tmpdir]
        assert leftovers == [], leftovers
        assert list(self.tmpdir.iterdir()) == [], "temporary folders or files left in TMPDIR"
        assert not self.out.exists() or list(self.out.iterdir()) == [], "an interrupted run wrote outputs"
        assert {p.name: p.read_bytes() for p in self.folder.iterdir() if p.is_file()} == self.inputs


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.5], ids=["at-start", "after-0.05s", "after-0.5s"])
def test_signal_while_starting_gives_one_line_and_leaves_nothing(tmp_path, signum, delay):
    run = Run(tmp_path)
    run.wait_for_handlers()
    time.sleep(delay)

    run.process.send_signal(signum)
    code, lines = run.finish()

    assert (code, lines) == (EXPECTED[signum][0], [EXPECTED[signum][1]])
    run.check_nothing_left_behind()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_pass_gives_one_error_line_of_its_own_and_leaves_nothing(tmp_path, signum):
    run = Run(tmp_path, quiet=False)
    run.wait_for_first_pass()
    time.sleep(0.2)

    run.process.send_signal(signum)
    code, lines = run.finish()

    assert code == EXPECTED[signum][0]
    assert lines[-1] == EXPECTED[signum][1]
    assert all(line.startswith("[") and "error" not in line for line in lines[:-1]), lines  # progress only
    run.check_nothing_left_behind()


def test_a_second_sigint_while_cleaning_up_changes_nothing(tmp_path):
    run = Run(tmp_path, quiet=False)
    run.wait_for_first_pass()

    run.process.send_signal(signal.SIGINT)
    time.sleep(0.005)
    run.process.send_signal(signal.SIGINT)
    code, lines = run.finish()

    # A second signal that arrives once Python is shutting down ends the process by that signal (its default
    # action then): the shell reports 130 for both.
    assert code in (130, -signal.SIGINT) and lines[-1] == "error: interrupted"
    assert sum("error" in line for line in lines) == 1, lines
    run.check_nothing_left_behind()


def test_a_signal_lost_in_a_weakref_callback_is_raised_again_in_the_code_that_follows():
    from onnxforge.stop_signals import StopOnSignals

    class Owner:
        pass

    owner = Owner()
    reference = weakref.ref(owner, lambda _: signal.raise_signal(signal.SIGINT))  # Python ignores what this raises
    stop = StopOnSignals()
    try:
        with pytest.raises(KeyboardInterrupt):
            del owner
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pass
    finally:
        stop.restore()
    assert reference() is None
