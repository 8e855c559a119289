import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx

from onnxforge.backends import get_backend
from onnxforge.cli import optimize_main
from onnxforge.comparison import compare_outputs
from onnxforge.examples import INPUT_SHAPE, build_example_model


def _op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_example_module_writes_a_valid_model(tmp_path):
    out = tmp_path / "example.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "onnxforge.examples", str(out)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and str(out) in done.stdout
    onnx.checker.check_model(str(out))
    ops = _op_counts(out)
    assert ops["Identity"] >= 3 and ops["Constant"] >= 3 and ops["Shape"] == 1 and ops["Dropout"] == 1


def test_example_model_is_deterministic():
    assert build_example_model().SerializeToString() == build_example_model().SerializeToString()


def test_cleanup_of_example_removes_clutter_and_keeps_outputs(tmp_path, capsys):
    original, optimized, report = tmp_path / "ex.onnx", tmp_path / "ex.opt.onnx", tmp_path / "r.json"
    onnx.save(build_example_model(), str(original))

    code = optimize_main([str(original), "--passes", "cleanup", "-o", str(optimized), "--report", str(report)])

    assert code == 0, capsys.readouterr().err
    passes = json.loads(report.read_text())["passes"]
    assert [p["status"] for p in passes] == ["applied"]
    before, after = _op_counts(original), _op_counts(optimized)
    assert sum(after.values()) < sum(before.values())
    for op in ("Identity", "Dropout", "Constant", "Shape", "Gather", "Unsqueeze", "Concat", "GlobalAveragePool"):
        assert after[op] == 0, op
    assert after["Conv"] == before["Conv"] == 4
    backend = get_backend("ort")
    ref, cand = backend.prepare(str(original)), backend.prepare(str(optimized))
    rng = np.random.default_rng(123)
    inputs = [{"x": rng.standard_normal(INPUT_SHAPE, dtype=np.float32)} for _ in range(3)]
    comparison = compare_outputs([ref.run(i) for i in inputs], [cand.run(i) for i in inputs])
    assert comparison.within(1e-4), comparison.to_dict()
