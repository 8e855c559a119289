"""The public API type-checks: mypy, configured in pyproject.toml ([tool.mypy]), passes on `onnxforge` and
`onnxforge.api`, and the package ships the `py.typed` marker so that users' type checkers read its hints."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_package_is_marked_as_typed():
    assert (REPO / "onnxforge" / "py.typed").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed (it comes with the test extra)"
)
def test_mypy_passes_on_the_public_api(tmp_path):
    # A fresh cache in tmp_path: nothing is written into the checkout and no stale result is reused.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
