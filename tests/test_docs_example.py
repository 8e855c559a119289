"""The example passes of docs/writing-a-pass.md work as the page says (run in a subprocess: they register passes)."""

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


def _write_files(folder: Path, plugin: str, make_model: str) -> Path:
    """Write the page's `plugin` and `make_model` files into `folder` and run `make_model` there."""
    files = {m["name"]: m["code"] for m in FILE_BLOCK.finditer(DOC.read_text())}
    assert set(files) == {"my_passes.py", "make_model.py", "my_data_passes.py", "make_data_model.py"}
    for name in (plugin, make_model):
        (folder / name).write_text(files[name] + "\n")
    subprocess.run([sys.executable, make_model], cwd=folder, check=True)
    return folder


@pytest.fixture
def workdir(tmp_path):
    return _write_files(tmp_path, "my_passes.py", "make_model.py")


@pytest.fixture
def data_workdir(tmp_path):
    return _write_files(tmp_path, "my_data_passes.py", "make_data_model.py")


def _optimize(workdir, *args, plugin="my_passes.py"):
    return subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", "model.onnx", "--plugin", plugin, *args],
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


def test_doc_data_aware_pass_zeroes_the_rows_of_quiet_features_and_reports_the_held_out_error(data_workdir):
    args = ["--passes", "zero-quiet-inputs", "--data", "samples.npz", "-o", "out.onnx", "--report", "r.json"]
    done = _optimize(data_workdir, *args, plugin="my_data_passes.py")

    assert done.returncode == 0, done.stderr
    record = json.loads((data_workdir / "r.json").read_text())["passes"][0]
    assert record["status"] == "applied" and record["stats"]["rows_zeroed"] == 3
    [note] = record["notes"]
    assert note.startswith("worst relative error ") and note.endswith(" on 4 held-out samples")  # 16 samples, 4 out
    [before], [after] = (_weights(data_workdir / name, (8, 16)) for name in ("model.onnx", "out.onnx"))
    assert not after[5:].any() and np.array_equal(after[:5], before[:5])  # the rows that read the 3 quiet features
    backend = get_backend("ort")
    old, new = backend.prepare(str(data_workdir / "model.onnx")), backend.prepare(str(data_workdir / "out.onnx"))
    held_out = [{"x": x} for x in np.load(data_workdir / "samples.npz")["x"][-4:]]
    error = compare_outputs([old.run(s) for s in held_out], [new.run(s) for s in held_out]).max_rel
    assert 0 < error < 0.01 and f"{error:.3g}" in note


def test_doc_data_aware_pass_needs_data(data_workdir):
    done = _optimize(data_workdir, "--passes", "zero-quiet-inputs", "-o", "out.onnx", plugin="my_data_passes.py")

    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == "error: zero-quiet-inputs measures activations: give samples with --data"


def _weights(path: Path, shape: tuple[int, ...]) -> list[np.ndarray]:
    """The weights of the model at `path` that have `shape`."""
    arrays = [onnx.numpy_helper.to_array(w) for w in onnx.load(str(path)).graph.initializer]
    return [array for array in arrays if array.shape == shape]


def test_doc_pipeline_of_passes_runs_as_one_pass_with_its_members_checked(workdir):
    blocks = re.findall(r"```python\n(.*?)\n```", DOC.read_text(), re.DOTALL)
    (snippet,) = [block for block in blocks if "Pipeline([" in block]
    script = "import onnxforge\nfrom my_passes import RemoveMulByOne\n" + snippet + (
        "\nrecord = report.passes[0]\nprint(record.name, record.status, record.stats['mul_by_one_removed'])"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "pipeline(cleanup,fuse,remove-mul-one) applied 2"
