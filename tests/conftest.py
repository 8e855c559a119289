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


@pytest.fixture(scope="session")
def rpc_tracker():
    """A TVM RPC tracker on 127.0.0.1 with two RPC servers of key `onnxforge-test`, started once for the modules
    that run on one (each server and the tracker import TVM, which is most of a module's time otherwise)."""
    pytest.importorskip("tvm")
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    from onnxforge.backends.tvm.rpc import loopback_tracker

    with loopback_tracker("onnxforge-test", servers=2) as address:
        yield address
