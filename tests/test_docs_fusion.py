"""The example rules of docs/fusion.md work as the page says (run in a subprocess: they register a pass)."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxforge.backends import get_backend
from onnxforge.backends.base import BackendOptions
from onnxforge.comparison import compare_outputs

DOC = Path(__file__).resolve().parent.parent / "docs" / "fusion.md"
FILE_BLOCK = re.compile(r"<!-- file: (?P<name>[\w.]+) -->\n```python\n(?P<code>.*?)\n```", re.DOTALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion-doc")
    files = {m["name"]: m["code"] for m in FILE_BLOCK.finditer(DOC.read_text())}
    assert set(files) == {"my_fusions.py", "make_model.py"}
    for name, code in files.items():
        (folder / name).write_text(code + "\n")
    subprocess.run([sys.executable, "make_model.py"], cwd=folder, check=True)
    return folder


def _optimize(workdir, model, passes, out):
    done = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", model, "--plugin", "my_fusions.py", "--passes", passes]
        + ["-o", out, "--report", f"{out}.json", "--seed", "0"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records = json.loads((workdir / f"{out}.json").read_text())["passes"]
    return Counter(n.op_type for n in onnx.load(str(workdir / out)).graph.node), records


def _same_outputs(workdir, before, after):
    # Level "disable": onnxruntime must not fuse the original itself before the comparison.
    backend, options = get_backend("ort"), BackendOptions(graph_optimization="disable")
    a, b = backend.prepare(str(workdir / before), options), backend.prepare(str(workdir / after), options)
    rng = np.random.default_rng(7)
    inputs = [{"x": rng.standard_normal((2, 8), dtype=np.float32)} for _ in range(3)]
    return compare_outputs([a.run(i) for i in inputs], [b.run(i) for i in inputs]).within(1e-4)


def test_doc_example_fuses_softplus_then_mish_at_opset_18(workdir):
    ops, records = _optimize(workdir, "model.onnx", "cleanup,fuse-mish", "out.onnx")

    assert ops == {"MatMul": 1, "Mish": 1}
    assert records[1]["status"] == "applied" and records[1]["stats"] == {"softplus": 1, "mish": 1}
    assert _same_outputs(workdir, "model.onnx", "out.onnx")


def test_doc_example_declines_mish_below_opset_18_but_keeps_softplus(workdir):
    ops, records = _optimize(workdir, "model17.onnx", "cleanup,fuse-mish", "out17.onnx")

    assert ops == {"MatMul": 1, "Softplus": 1, "Tanh": 1, "Mul": 1}
    assert records[1]["stats"] == {"softplus": 1}
    assert _same_outputs(workdir, "model17.onnx", "out17.onnx")


def test_doc_example_pass_runs_inside_fuse(workdir):
    ops, records = _optimize(workdir, "model.onnx", "cleanup,fuse", "fused.onnx")

    assert ops == {"MatMul": 1, "Mish": 1}
    assert records[1]["status"] == "applied"
    assert records[1]["stats"]["softplus"] == 1 and records[1]["stats"]["mish"] == 1
