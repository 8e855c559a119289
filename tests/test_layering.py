"""The linter and the import-layer bans (docs/architecture.md, "Layers and what each may import") run as part of
the test suite: a layer that imports one above it fails here, with ruff's report as the message."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (it comes with the test extra)"
)


def _ruff_check(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # --no-cache: ruff's cache can keep results from before a nested ruff.toml changed (astral-sh/ruff#12264).
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_as(path: str, source: str) -> subprocess.CompletedProcess[str]:
    """Lint `source` as if it were the file `path` of this repository, under that folder's configuration."""
    return _ruff_check("--stdin-filename", path, "-", stdin=source)


def test_ruff_passes_on_the_whole_repository():
    result = _ruff_check(str(REPO))
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("path", "source", "banned"),
    [
        ("onnxforge/ir/new.py", "from onnxforge.pipeline.base import Pass\n", "onnxforge.pipeline"),
        ("onnxforge/ir/new.py", "from onnxforge.passes.layers import find_layers\n", "onnxforge.passes"),
        ("onnxforge/ir/new.py", "from onnxforge import backends\n", "onnxforge.backends"),
        ("onnxforge/ir/new.py", "import onnxruntime as ort\nort.InferenceSession('m')\n", "onnxruntime.Infer"),
        ("onnxforge/passes/new.py", "from onnxforge.backends.onnxruntime import OrtBackend\n", "onnxforge.backends"),
        ("onnxforge/passes/fusion/new.py", "import tvm\n", "tvm"),
        ("onnxforge/passes/cleanup/new.py", "import onnxruntime as ort\n", "onnxruntime"),
        ("onnxforge/passes/quantization/new.py", "from onnxforge.api import optimize\n", "onnxforge.api"),
        ("onnxforge/backends/new.py", "from onnxforge.pipeline.registry import get_pass\n", "onnxforge.pipeline"),
        ("onnxforge/pipeline/new.py", "from onnxforge.passes.quantization.quant import Quantize\n", "onnxforge.passes"),
        ("onnxforge/pipeline/new.py", "import onnxruntime as ort\n", "onnxruntime"),
        ("onnxforge/pipeline/new.py", "from onnxforge.report import OptimizationReport\n", "onnxforge.report"),
        ("onnxforge/backends/tvm/new.py", "from onnxforge.report import OptimizationReport\n", "onnxforge.report"),
        ("onnxforge/calibration/new.py", "from onnxforge.backends import get_backend\n", "onnxforge.backends"),
        ("onnxforge/distill/new.py", "import onnxruntime as ort\n", "onnxruntime"),
        ("onnxforge/passes/distillation/new.py", "import torch\n", "torch"),
    ],
)
def test_an_import_from_a_banned_layer_fails_the_lint(path, source, banned):
    result = _check_as(path, f"{source}__all__ = []\n")
    assert result.returncode == 1, f"{path} importing {banned} passed the lint:\n{result.stdout}{result.stderr}"
    assert "TID251" in result.stdout and f"`{banned}" in result.stdout, result.stdout


def test_calibration_may_name_pass_types_for_type_checking_only():
    typing_only = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from onnxforge.pipeline.context import PassContext\n"
        "def observe(ctx: PassContext) -> None: ...\n"
    )
    assert _check_as("onnxforge/calibration/new.py", typing_only).returncode == 0
    at_run_time = "from onnxforge.pipeline.context import PassContext\n__all__ = ['PassContext']\n"
    result = _check_as("onnxforge/calibration/new.py", at_run_time)
    assert result.returncode == 1 and "TID253" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("path", "source"),
    [
        # The two passes that once ran or read onnxruntime themselves now ask ctx.runtime (evaluate, operator_schema).
        ("onnxforge/passes/cleanup/constant_folding.py", "import onnxruntime as ort\n__all__ = ['ort']\n"),
        (
            "onnxforge/passes/quantization/half_precision.py",
            "from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema\n"
            "__all__ = ['get_all_operator_schema']\n",
        ),
    ],
)
def test_no_pass_file_is_exempt_from_the_bans(path, source):
    result = _check_as(path, source)
    assert result.returncode == 1 and "TID251" in result.stdout, f"{path}:\n{result.stdout}{result.stderr}"


def test_a_layer_may_import_what_sits_below_it():
    source = (
        "from onnxforge.errors import OnnxforgeError\n"
        "from onnxforge.ir import Model\n"
        "__all__ = ['Model', 'OnnxforgeError']\n"
    )
    for path in ("onnxforge/ir/new.py", "onnxforge/passes/new.py", "onnxforge/backends/new.py"):
        result = _check_as(path, source)
        assert result.returncode == 0, f"{path}:\n{result.stdout}{result.stderr}"
