"""Models over 2 GiB: loaded and saved through external data without holding the weights in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ELEMENTS = 2**29 + 2**20  # float32: 2.004 GiB, past protobuf's 2 GiB limit


def _write_large_model(folder) -> str:
    """y = Gather(w, idx) with a 2 GiB weight in a sparse data file (costs no disk, reads as zeros)."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[ELEMENTS])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", str(ELEMENTS * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "idx"], ["g"]), helper.make_node("Identity", ["g"], ["y"])],
        "big",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with open(folder / "big.data", "wb") as f:
        f.truncate(ELEMENTS * 4)
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def _run_measured(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints a JSON dict; peak RSS in MiB is added as rss_mib.

    The peak is the interpreter's own (VmHWM): Linux's ru_maxrss also counts the parent's memory at the fork
    before exec, so a large test process would be charged to the child.
    """
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json as _json, resource
        try:
            with open("/proc/self/status") as _status:
                _peak = next(int(line.split()[1]) for line in _status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            _peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["rss_mib"] = _peak / 1024
        print(_json.dumps(result))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_model_over_2gib_loads_and_saves_without_reading_its_weights_into_memory(tmp_path):
    source = _write_large_model(tmp_path)
    out = tmp_path / "out" / "saved.onnx"
    result = _run_measured(
        f"""
        from onnxforge.ir import load_model, save_model
        model = load_model({source!r})
        stats = model.stats()
        save_model(model, {str(out)!r})
        result = {{"bytes": stats.bytes, "external": model.has_external_data}}
        """
    )
    assert result["bytes"] == ELEMENTS * 4 > 2**31
    assert result["external"]
    assert result["rss_mib"] < 600, "weights were read into memory"
    saved = onnx.load(str(out), load_external_data=False)
    (weight,) = saved.graph.initializer
    assert weight.data_location == TensorProto.EXTERNAL
    assert (out.parent / "saved.onnx.data").stat().st_size >= ELEMENTS * 4


@pytest.mark.slow
def test_cleanup_of_a_model_over_2gib_end_to_end(tmp_path):
    source = _write_large_model(tmp_path)
    out = tmp_path / "opt.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", source, "--passes", "cleanup", "-o", str(out), "-q"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    from onnxforge.backends import get_backend

    y = get_backend("ort").prepare(str(out)).run({"idx": np.array([0, 1, 2, 3], np.int64)})["y"]
    np.testing.assert_array_equal(y, np.zeros(4, np.float32))
    assert [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node] == ["Gather"]
