"""The example plugin package (examples/plugin) installs into a fresh virtual environment, and that environment's
`optimize` finds its pass through the entry point and runs it."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "examples" / "plugin"


def _can_build_offline() -> bool:
    """Whether pip can build a setuptools project here without downloading its build backend: setuptools with a
    wheel builder (its own since setuptools 70.1, else the wheel package's)."""
    try:
        return any(importlib.util.find_spec(name) for name in ("setuptools.command.bdist_wheel", "wheel.bdist_wheel"))
    except ModuleNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _can_build_offline(), reason="building the plugin offline needs setuptools>=70.1")


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> Path:
    """A folder holding `venv`, a fresh virtual environment with onnxforge (editable, from this checkout) and the
    example plugin installed, and `plugin`, the copy of the plugin it was built from."""
    root = tmp_path_factory.mktemp("plugin_env")
    # Not `--system-site-packages`: that exposes the base interpreter's packages, and the suite may run in a virtual
    # environment of its own (CI does), whose onnx, onnxruntime, pip and setuptools the base one lacks. Instead a .pth
    # file adds this interpreter's site folders (their .pth files run too, an editable install's included) after the
    # new environment's own, so nothing is downloaded and what is installed there comes first.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    site_packages = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root)
    site_folders = [path for path in sys.path if path.endswith(("site-packages", "dist-packages"))]
    bridge = "".join(f"import site; site.addsitedir({folder!r})\n" for folder in site_folders)
    (Path(site_packages.stdout.strip()) / "parent_environment.pth").write_text(bridge)
    # The plugin is built from a copy, so that its build/ and .egg-info land outside the repository. onnxforge is
    # installed too for its `optimize` script; its editable build writes nothing into the checkout.
    plugin_copy = shutil.copytree(PLUGIN, root / "plugin", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    offline = ["--no-index", "--no-build-isolation", "--no-deps"]
    for source in (["-e", REPO], [plugin_copy]):
        done = _run(python, "-m", "pip", "install", "-q", *offline, *source, cwd=root)
        assert done.returncode == 0, done.stderr
    return root


def _documented_model() -> onnx.ModelProto:
    """y = Identity(x) @ W + b, with doc strings on the model and graph and two metadata entries."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["x_copy"]),
            helper.make_node("MatMul", ["x_copy", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["y"]),
        ],
        "documented",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
        ],
        doc_string="the graph",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string="the model")
    helper.set_model_props(model, {"author": "someone", "source": "/home/someone/run42"})
    return model


def test_the_environments_optimize_lists_the_plugin_pass(plugin_env, tmp_path):
    done = _run(plugin_env / "venv" / "bin" / "optimize", "--list-passes", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert any(line.split()[:2] == ["strip-metadata", "lossless"] for line in done.stdout.splitlines()), done.stdout


def test_the_environments_optimize_runs_the_plugin_pass_and_keeps_the_outputs(plugin_env, tmp_path):
    onnx.save(_documented_model(), tmp_path / "model.onnx")
    optimize = plugin_env / "venv" / "bin" / "optimize"

    done = _run(optimize, "model.onnx", "--passes", "cleanup,strip-metadata", "-o", "out.onnx", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    out = onnx.load(tmp_path / "out.onnx")
    assert [node.op_type for node in out.graph.node] == ["MatMul", "Add"]  # cleanup ran too
    assert (out.doc_string, out.graph.doc_string, list(out.metadata_props)) == ("", "", [])
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    before, after = (
        ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        for name in ("model.onnx", "out.onnx")
    )
    np.testing.assert_array_equal(before[0], after[0])


def test_the_plugins_own_tests_pass_against_the_installed_package(plugin_env, tmp_path):
    # Run from outside the copy, so that they import the installed package and not the sources beside them.
    python, tests = plugin_env / "venv" / "bin" / "python", plugin_env / "plugin" / "tests"

    done = _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, cwd=tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
