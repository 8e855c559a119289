"""The TVM coverage benchmark (benchmarks/tvm_coverage.py) puts conformance cases in the category TVM earns them,
and its worker process is restarted after a case that kills it."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
from onnx.backend.test.case import node as node_cases

pytest.importorskip("tvm")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tvm_coverage  # noqa: E402
from tvm_coverage import Outcome, Worker, case_ops, classify, quiet  # noqa: E402

from onnxforge.backends import get_backend  # noqa: E402

EXPECTED = {
    "test_relu": tvm_coverage.PASS,
    "test_add": tvm_coverage.PASS,
    "test_conv_with_strides_padding": tvm_coverage.PASS,
    "test_if": tvm_coverage.IMPORT_UNSUPPORTED,  # control flow: not in TVM's ONNX importer
    "test_identity_sequence": tvm_coverage.SKIPPED,  # a sequence input: the backend feeds tensors only
}


class _ExitOnArrival:
    """Unpickled by the worker, it ends the worker's process at once: a stand-in for a crash inside TVM."""

    def __reduce__(self):
        return os._exit, (3,)


@pytest.fixture(scope="module")
def cases():
    # Importing an operator's case module generates its cases (into the list collect_testcases returns): a
    # fraction of a second for these five, where collecting all takes 5 to 10 s. A later collect_testcases()
    # still imports the other modules and returns every case once.
    with quiet():
        for module in ("relu", "add", "conv", "if_", "identity"):
            importlib.import_module(f"{node_cases.__name__}.{module}")
    return {case.name: case for case in node_cases._NodeTestCases if case.name in EXPECTED or "relu" in case.name}


def test_conformance_cases_land_in_the_category_tvm_earns_them(cases):
    backend = get_backend("tvm")
    with quiet():
        found = {name: classify(cases[name], backend).category for name in EXPECTED}
    assert found == EXPECTED


def test_unsupported_op_and_unfeedable_input_are_named_in_the_reason(cases):
    backend = get_backend("tvm")
    with quiet():
        assert classify(cases["test_if"], backend).reason.endswith("does not support: If")
        assert classify(cases["test_identity_sequence"], backend).reason == "cannot feed sequence input 'x'"


def test_expanded_cases_are_counted_under_the_function_they_expand(cases):
    ops = case_ops(list(cases.values()))
    assert ops["test_relu"] == "Relu"
    assert ops["test_relu_expanded_ver18"] == "Relu (expanded)"


def test_worker_reports_a_crash_and_restarts_for_the_next_case(cases, tmp_path):
    log = tmp_path / "worker.log"
    log.touch()
    # onnxruntime's worker starts in a second where TVM's takes several: the restart logic is the same.
    with Worker(log, backend="ort") as worker:
        crashed = worker.classify(_ExitOnArrival(), timeout_s=60)
        assert crashed == Outcome(tvm_coverage.CRASHED, "crashed (exit code 3) while receiving the case")
        assert worker.classify(cases["test_relu"], timeout_s=60) == Outcome(tvm_coverage.PASS)
        assert worker.starts == 2
