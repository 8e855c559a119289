"""The example pass of docs/writing-a-pass.md works as the page says (run in a subprocess: it registers a pass)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxforge.backends import get_backend
from onnxforge.comparison import compare_outputs

DOC = Path(__file__).resolve().parent.parent / "docs" / "writing-a-pass.md"
FILE_BLOCK = re.compile(r"<!-- file: (?P<name>[\w.]+) -->\n```python\n(?P<code>.*?)\n```", re.DOTALL)


@pytest.fixture
def workdir(tmp_path):
    files = {m["name"]: m["code"] for m in FILE_BLOCK.finditer(DOC.read_text())}
    assert set(files) == {"my_passes.py", "make_model.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code + "\n")
    subprocess.run([sys.executable, "make_model.py"], cwd=tmp_path, check=True)
    return tmp_path


def _optimize(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", "model.onnx", "--plugin", "my_passes.py", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )


def test_doc_example_pass_removes_both_muls_by_one_and_keeps_outputs(workdir):
    done = _optimize(workdir, "--passes", "remove-mul-one", "-o", "out.onnx", "--report", "r.json")

    assert done.returncode == 0, done.stderr
    assert [n.op_type for n in onnx.load(str(workdir / "out.onnx")).graph.node] == ["Relu", "Mul"]
    record = json.loads((workdir / "r.json").read_text())["passes"][0]
    assert record["status"] == "applied" and record["stats"]["mul_by_one_removed"] == 2
    backend = get_backend("ort")
    before, after = backend.prepare(str(workdir / "model.onnx")), backend.prepare(str(workdir / "out.onnx"))
    rng = np.random.default_rng(7)
    inputs = [{"x": rng.standard_normal((2, 8), dtype=np.float32)} for _ in range(3)]
    assert compare_outputs([before.run(i) for i in inputs], [after.run(i) for i in inputs]).within(1e-4)


def test_doc_example_pass_with_too_large_tolerance_is_rolled_back(workdir):
    done = _optimize(workdir, "--passes", "remove-mul-one:tolerance=0.5", "-o", "out.onnx", "--report", "r.json")

    assert done.returncode == 0, done.stderr
    record = json.loads((workdir / "r.json").read_text())["passes"][0]
    assert record["status"] == "rolled_back" and "outputs changed" in record["error"]
    assert len(onnx.load(str(workdir / "out.onnx")).graph.node) == 4


def test_doc_example_pass_stops_the_run_with_one_error_line(workdir):
    done = _optimize(workdir, "--passes", "remove-mul-one:tolerance=0.5", "--on-error", "stop", "-o", "out.onnx")

    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: pass 'remove-mul-one:tolerance=0.5' failed")
    assert not (workdir / "out.onnx").exists()
