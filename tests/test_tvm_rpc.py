"""Remote runs through TVM's RPC tracker: a model loaded on a server the tracker hands out gives the local outputs
and sane timings, two servers serve two sessions at once, and a wrong key or a dead tracker is one quick error."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from graph_checks import constant, make_model, value_info
from onnx import helper

from onnxforge.backends import BackendOptions, get_backend
from onnxforge.errors import BackendError
from onnxforge.measure import MeasureOptions

pytest.importorskip("tvm")

from onnxforge.backends.tvm.rpc import (  # noqa: E402  (needs tvm)
    TrackerAddress,
    free_servers,
    prepare_remote,
)

KEY = "onnxforge-test"


@pytest.fixture
def tracker(rpc_tracker):
    assert rpc_tracker.key == KEY
    return rpc_tracker


@pytest.fixture(scope="module")
def compiled():
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("MatMul", ["f", "m"], ["y"]),
        ],
        [value_info("x", [1, 3, 8, 8])],
        [value_info("y", [1, 10])],
        [
            constant("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
            constant("b", rng.standard_normal(4).astype(np.float32)),
            constant("m", rng.standard_normal((4 * 8 * 8, 10)).astype(np.float32)),
        ],
    )
    return get_backend("tvm").compile(model, BackendOptions(target="cpu", threads=1))


def _inputs(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_remote_run_gives_the_local_outputs(tracker, compiled):
    local, remote = compiled.load(), prepare_remote(compiled, tracker, timeout_s=30)
    for seed in (0, 1):
        expected, actual = local.run(_inputs(seed)), remote.run(_inputs(seed))
        assert list(actual) == ["y"]
        np.testing.assert_allclose(actual["y"], expected["y"], rtol=1e-5, atol=1e-5)


def test_models_with_several_outputs_run_and_measure_remotely(tracker):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
        [value_info("x", [2, 3])],
        [value_info("a", [2, 3]), value_info("b", [2, 3])],
    )
    compiled = get_backend("tvm").compile(model, BackendOptions(target="cpu", threads=1))
    remote = prepare_remote(compiled, tracker, timeout_s=30)
    x = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    actual = remote.run(x)
    assert list(actual) == ["a", "b"]
    np.testing.assert_array_equal(actual["a"], np.maximum(x["x"], 0))
    np.testing.assert_array_equal(actual["b"], -x["x"])
    assert remote.measure(x, MeasureOptions(warmup=1, min_repeats=3, min_time_s=0, max_time_s=1)).repeats >= 3


def test_remote_measure_times_runs_on_the_server(tracker, compiled):
    remote = prepare_remote(compiled, tracker, timeout_s=30)
    stats = remote.measure(_inputs(0), MeasureOptions(warmup=2, min_repeats=10, min_time_s=0.05, max_time_s=2))
    assert stats.repeats >= 10
    assert 0 < stats.min_ms <= stats.median_ms <= stats.max_ms


def test_two_servers_serve_two_sessions_at_once(tracker, compiled):
    first = prepare_remote(compiled, tracker, timeout_s=30)
    second = prepare_remote(compiled, tracker, timeout_s=30)
    assert free_servers(tracker) == 0
    np.testing.assert_allclose(first.run(_inputs(2))["y"], second.run(_inputs(2))["y"], rtol=1e-6)
    del first, second  # the servers go back to the tracker
    deadline = time.monotonic() + 20
    while free_servers(tracker) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert free_servers(tracker) == 2


def test_a_key_no_server_has_is_a_quick_error_naming_the_tracker(tracker, compiled):
    wrong = TrackerAddress(tracker.host, tracker.port, "no-such-board")
    start = time.monotonic()
    with pytest.raises(BackendError, match=f"no RPC server of key 'no-such-board'.*{tracker.port}"):
        prepare_remote(compiled, wrong, timeout_s=0.5)
    assert time.monotonic() - start < 10  # the export included


def test_a_dead_tracker_port_is_a_quick_error_naming_the_address(compiled):
    address = TrackerAddress("127.0.0.1", _dead_port(), KEY)
    start = time.monotonic()
    with pytest.raises(BackendError, match=f"no RPC tracker answers at 127.0.0.1:{address.port}:{KEY}"):
        prepare_remote(compiled, address, timeout_s=0.5)
    assert time.monotonic() - start < 10


def test_tracker_addresses_parse_from_host_port_key():
    assert TrackerAddress.parse("10.0.0.5:9190:rasp4") == TrackerAddress("10.0.0.5", 9190, "rasp4")
    assert TrackerAddress.parse("[::1]:9190:rasp4") == TrackerAddress("::1", 9190, "rasp4")
    assert str(TrackerAddress("::1", 9190, "rasp4")) == "[::1]:9190:rasp4"


@pytest.mark.parametrize("text", ["", "host:9190", "host:port:key", ":9190:key", "host:0:key", "host:9190:", "h:1:a b"])
def test_malformed_tracker_addresses_are_one_line_errors(text):
    with pytest.raises(BackendError, match="HOST:PORT:KEY") as caught:
        TrackerAddress.parse(text)
    assert "\n" not in str(caught.value)


def test_bench_with_rpc_times_the_model_on_a_server_of_the_tracker(tracker, tmp_path):
    from test_cli import ONNXFORGE, _model, _save, run_cli, succeeded

    model = _save(_model(), tmp_path / "model.onnx")
    result = succeeded(run_cli(ONNXFORGE, "bench", model, "--backend", "tvm", "--rpc", str(tracker),
                               "--repeats", "5", "--min-time", "0.05", "--json", tmp_path / "stats.json"))
    assert "median" in result.stdout and free_servers(tracker) == 2
