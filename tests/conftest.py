"""Suite-wide test settings: tests marked slow run only when ONNXFORGE_SLOW=1; fixtures any test module may use."""

from __future__ import annotations

import os

import pytest
from postgres_server import postgres_url  # noqa: F401  (a fixture: pytest finds it here)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("ONNXFORGE_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: set ONNXFORGE_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
