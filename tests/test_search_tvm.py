"""optimize --auto on the TVM backend: candidates compiled and timed by TVM's own time evaluator, here and on a
board of an RPC tracker (two RPC servers on this machine stand in for boards)."""

import pytest
from test_search import FAST, _mlp

from onnxforge.search import search

pytest.importorskip("tvm")

SHAPES = {"x": [8, 64]}


def test_a_search_on_tvm_times_candidates_on_the_device(tmp_path):
    model = _mlp(tmp_path / "mlp.onnx", width=64)
    result = search(model, passes="cleanup", backend="tvm", shapes=SHAPES, trials=1, min_speedup=0.0, timing=FAST)
    assert result.improved, result.message
    row = result.report["trials"][0]
    assert row["speedup"] > 0 and row["input_latency_ms"] > 0
    assert result.session is None  # session settings are onnxruntime's; TVM has none to search
    assert result.report["space"]["session"] == {}


def test_a_search_measures_on_a_board_of_an_rpc_tracker(tmp_path, rpc_tracker):
    model = _mlp(tmp_path / "mlp.onnx", width=64)
    rpc = f"{rpc_tracker.host}:{rpc_tracker.port}:{rpc_tracker.key}"
    result = search(model, passes="cleanup", backend="tvm", shapes=SHAPES, backend_settings={"rpc": rpc},
                    trials=1, min_speedup=0.0, timing=FAST)
    assert result.improved, result.message
    assert result.report["setup"]["backend_settings"] == {"rpc": rpc}
    assert result.report["trials"][0]["speedup"] > 0
