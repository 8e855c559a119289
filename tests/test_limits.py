"""Time limits: --timeout, --pass-timeout, the bound of one model execution, and Ctrl-C while a model runs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import ONNXFORGE, OPTIMIZE, _model, run_cli

from onnxforge.api import optimize
from onnxforge.backends import get_backend
from onnxforge.limits import Deadline, TimeLimitError, execution_time_limit

SLOW_PASS_PLUGIN = Path(__file__).parent / "plugins_fixtures" / "slow_pass.py"


def _endless_loop_model() -> onnx.ModelProto:
    """y = x + trips, computed by a Loop of 2^62 trips (a 300-byte model that never ends)."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[
            numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def endless(tmp_path) -> Path:
    path = tmp_path / "endless.onnx"
    onnx.save(_endless_loop_model(), path)
    return path


@pytest.mark.parametrize(
    "command",
    [
        lambda model, out: [*OPTIMIZE, model, "-o", out],
        lambda model, out: [*ONNXFORGE, "bench", model, "--json", out],
        lambda model, out: [*ONNXFORGE, "compare", model, model, "--json", out],
    ],
    ids=["optimize", "bench", "compare"],
)
def test_timeout_stops_an_endless_model_with_one_error_line(endless, tmp_path, command):
    out = tmp_path / "out.json"
    start = time.monotonic()
    result = run_cli(command(endless, out), "--timeout", "3")
    assert time.monotonic() - start < 12
    assert result.returncode == 1
    assert result.stderr.startswith("error: time limit of 3 s exceeded") and result.stderr.count("\n") == 1
    assert not out.exists()


def test_one_execution_is_bounded_without_any_time_limit(endless):
    start = time.monotonic()
    with pytest.raises(TimeLimitError, match="single model execution ran longer than 1 s"):
        optimize(str(endless), execution_timeout=1)
    assert time.monotonic() - start < 8


def test_ctrl_c_stops_optimize_while_onnxruntime_runs_the_model(endless, tmp_path):
    process = subprocess.Popen(
        [*map(str, OPTIMIZE), str(endless), "-o", str(tmp_path / "out.onnx")], stderr=subprocess.PIPE, text=True
    )
    time.sleep(3)  # imports done, the Loop running
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert time.monotonic() - start < 5
    assert process.returncode == 130
    assert stderr == "error: interrupted\n"
    assert list(tmp_path.iterdir()) == [endless]


def test_pass_beyond_pass_timeout_is_rolled_back_and_the_run_goes_on(tmp_path):
    model, out, report = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(_model(), model)
    start = time.monotonic()
    result = run_cli(
        OPTIMIZE, model, "--plugin", SLOW_PASS_PLUGIN, "--passes", "test-sleep:seconds=60,cleanup",
        "--pass-timeout", "1", "-o", out, "--report", report,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 15
    passes = json.loads(report.read_text())["passes"]
    assert [(p["status"], p["error"]) for p in passes] == [
        ("rolled_back", "exceeded --pass-timeout 1 s"),
        ("applied", ""),
    ]


def test_pass_that_swallows_the_timeout_is_still_rolled_back():
    _, report = optimize(
        _model(), "test-sleep:seconds=0,spin=1.5,cleanup", plugins=[str(SLOW_PASS_PLUGIN)], pass_timeout=0.5
    )
    assert [record.status for record in report.passes] == ["rolled_back", "applied"]
    assert report.passes[0].error == "exceeded --pass-timeout 0.5 s"


def test_deadline_stops_a_running_execution_and_restores_the_alarm_handler(endless):
    prepared = get_backend("ort").prepare(str(endless))
    handler = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(TimeLimitError, match="test limit"), Deadline(0.5, "test limit"):
        prepared.run({"x": np.zeros(1, np.float32)})
    assert time.monotonic() - start < 3
    assert signal.getsignal(signal.SIGALRM) is handler


def test_runs_within_the_limits_give_their_outputs():
    prepared = get_backend("ort").prepare(_model())
    x = np.ones((2, 8), np.float32)
    expected = prepared.run({"x": x})
    with Deadline(30, "unused"), execution_time_limit(30):
        outputs = [prepared.run({"x": x}) for _ in range(3)]
        prepared.measure({"x": x})
    for got in outputs:
        np.testing.assert_array_equal(got["y"], expected["y"])


@pytest.mark.parametrize(
    ("flag", "value"), [("--timeout", "0"), ("--timeout", "nan"), ("--pass-timeout", "-1"), ("--pass-timeout", "soon")]
)
def test_time_limits_must_be_positive_numbers(tmp_path, flag, value):
    model = tmp_path / "model.onnx"
    onnx.save(_model(), model)
    result = run_cli(OPTIMIZE, model, flag, value)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: argument {flag}: must be a finite number of seconds above 0")


def test_timeout_is_documented_with_the_bound_of_one_execution():
    result = run_cli([sys.executable, "-m", "onnxforge.cli", "bench", "--help"])
    assert "600 s" in " ".join(result.stdout.split())


_STUCK_MAIN_THREAD = """
import signal, time
from onnxforge.limits import Deadline
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as deaf as a thread inside C code
with Deadline(0.5, "time limit of 0.5 s exceeded", exit_code_if_stuck=1):
    time.sleep(30)
"""


def test_process_stuck_past_its_deadline_is_ended_with_one_line():
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _STUCK_MAIN_THREAD], capture_output=True, text=True, timeout=20)
    assert time.monotonic() - start < 10
    assert result.returncode == 1
    assert result.stderr == "error: time limit of 0.5 s exceeded\n"


def test_running_out_of_memory_is_one_error_line(capsys):
    from onnxforge.cli import OUT_OF_MEMORY, _guarded

    def command() -> int:
        try:
            raise MemoryError
        except MemoryError:
            raise ValueError("what the library made of it") from None  # as protobuf and graphsurgeon do

    assert _guarded(command) == 1
    assert capsys.readouterr().err == f"error: {OUT_OF_MEMORY}\n"
