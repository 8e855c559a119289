"""The benchmark suite (benchmarks/suite.py, `python -m benchmarks`) end to end on a small model made here, without
peers and with few timing rounds: the results it measures, and the JSON, page and plots it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import suite  # noqa: E402
from cases.agreement import embedding_cosines  # noqa: E402
from cases.trained_case import TrainedCase  # noqa: E402

from onnxforge.report import write_json  # noqa: E402


def small_case(folder: Path) -> TrainedCase:
    """A two-layer MLP (64 -> 256 -> 64, ReLU) with random weights, 8 calibration and 8 held-out inputs."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(shape).astype(np.float32) * 0.1 for shape in ((64, 256), (256, 64))]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, name) for w, name in zip(weights, ("w1", "w2"))],
    )
    path = folder / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    feeds = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(16)]
    return TrainedCase(
        name="mlp",
        description="a two-layer MLP made in the test",
        model_path=path,
        calibration=feeds[:8],
        held_out=feeds[8:],
        timing_feed=feeds[8],
        headline="worst_cosine",
        metrics={"worst_cosine": lambda ref, cand: embedding_cosines(ref, cand).min()},
    )


def test_suite_writes_its_json_page_and_plots(tmp_path, monkeypatch):
    # fp32 alone (the optimizations are the slow test's): what is written around the measurements.
    monkeypatch.setattr(suite, "optimizations", lambda *args: [])
    # openvino has no driver in peers.py: it is reported as not run, without installing anything.
    payload = suite.run_suite([small_case(tmp_path)], ["openvino"], quick=True, work=tmp_path)
    setup, env, (result,) = payload["setup"], payload["environment"], payload["results"]
    assert setup["quick"] and setup["timing"]["blocks"] == suite.QUICK_TIMING.blocks
    assert setup["concurrent_optimizations"] == suite.QUICK_CONCURRENCY
    steps = setup["step_seconds"]  # the suite's own time, per step
    assert {"peer environments", "fork server", "mlp"} <= set(steps)
    assert set(steps["mlp"]) == {"build", "onnxforge", "other tools", "judge", "time"}
    assert all(seconds >= 0 for seconds in steps["mlp"].values())
    assert {"start", "end", "max", "samples"} <= set(setup["load_average_1min"])
    assert env["cpu_count"] >= 1 and env["numpy"] == np.__version__ and env["onnxruntime"]
    no_driver = "benchmarks/peers.py has no driver for openvino"
    assert env["peers"] == {"openvino": {"requirements": [], "not_run": no_driver}}
    assert list(result["variants"]) == ["fp32", "openvino"]
    assert result["variants"]["fp32"]["speedup"] == 1.0
    assert result["variants"]["fp32"]["agreement"]["worst_cosine"] == pytest.approx(1)
    assert result["agreement_metric"] == "worst_cosine" and result["task_metric"] is None
    assert result["source"] == {}  # made here, not shipped in a pip package

    saved = tmp_path / "suite-quick.json"
    write_json(saved, payload)
    assert suite.main(["--from-json", str(saved)]) == 0  # a quick run's page goes beside its JSON
    text = (tmp_path / "suite-quick.md").read_text()
    assert "> **The quick run.**" in text and "## The machine" in text and "## mlp" in text
    assert "| openvino (its own environment) | not run: benchmarks/peers.py has no driver for openvino |" in text
    assert "| openvino | failed: benchmarks/peers.py has no driver for openvino |" in text
    assert "![mlp: speed and agreement](suite-quick-mlp.svg)" in text
    assert "## Where the suite's time goes" in text and "| case | building the case | onnxforge |" in text
    assert any(line.startswith("| mlp | ") and line.count("|") == 8 for line in text.splitlines())
    svg = (tmp_path / "suite-quick-mlp.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<!-- fp32 -->" in svg


def allocate_in_a_process(mib: int) -> dict:
    """A tool that runs in a process of its own, which holds `mib` MiB for a moment."""
    subprocess.run([sys.executable, "-c", f"held = b'x' * ({mib} << 20); import time; time.sleep(0.5)"], check=True)
    return {"path": None, "failure": "made no model"}


def test_peak_memory_is_the_tools_own():
    # The tool's process starts from this one, far larger (pytest, onnxruntime, the suite's imports): getrusage would
    # count this process's resident set at the fork as the tool's.
    step = suite.Optimization("allocate", "peer", "holds 100 MiB", allocate_in_a_process, (100,), own_process=True)
    made = suite.measured(step)
    assert 100 * 1.048 < made["peak_memory_mb"] < 160 and made["seconds"] >= 0.5
    assert 0 < made["cpu_seconds"] < made["seconds"]  # the child's CPU time counts; it mostly sleeps


@pytest.mark.slow  # four fresh processes and onnxforge's quant: about 15 s
def test_every_optimization_is_measured_in_a_process_of_its_own(tmp_path):
    payload = suite.run_suite([small_case(tmp_path)], [], quick=True, work=tmp_path)
    variants = payload["results"][0]["variants"]
    assert list(variants) == [
        "fp32", "onnxforge cleanup,fuse,quant", "onnxruntime quantize_dynamic", "onnxruntime quantize_static"
    ]
    for label, made in variants.items():
        assert made["path"] is not None, made.get("failure")
        assert made["latency"]["min_ms"] <= made["latency"]["median_ms"] <= made["latency"]["p90_ms"]
        assert made["speedup"] > 0 and made["bytes"] > 0 and made["agreement"]["worst_cosine"] > 0.9
        if label != "fp32":
            assert made["seconds"] >= 0 and made["cpu_seconds"] > 0 and 10 < made["peak_memory_mb"] < 4000
            assert made["window_s"][0] <= made["window_s"][1]
    assert payload["setup"]["load_average_1min"]["samples"] == 5  # at the start, after each optimization, at the end
    # --quick: onnxforge's run had the machine to itself; the other tools ran two at a time.
    onnxforge = variants["onnxforge cleanup,fuse,quant"]
    assert onnxforge["beside"] == [] and onnxforge["window_s"][1] <= variants["onnxruntime quantize_dynamic"]["window_s"][0]
    assert variants["onnxruntime quantize_dynamic"]["beside"] == ["onnxruntime quantize_static"]

    suite.write_page(payload, tmp_path / "page.md")
    rows = [line for line in (tmp_path / "page.md").read_text().splitlines() if line.startswith("| onnxforge ")]
    assert len(rows) == 1 and rows[0].count("|") == 9 and "failed" not in rows[0]


def _variant(kind: str, speedup: float, agreement: float, failure: str | None = None) -> dict:
    return {"kind": kind, "path": None if failure else "m.onnx", "failure": failure, "speedup": speedup,
            "speedup_iqr": [speedup - 0.1, speedup + 0.1], "agreement": {"worst_cosine": agreement}}


def test_the_glance_table_sets_onnxforge_beside_the_fastest_other_at_equal_agreement_and_at_any():
    variants = {
        "fp32": _variant("fp32", 1.0, 1.0),
        "onnxforge cleanup,fuse,quant": _variant("onnxforge", 1.5, 0.99),
        "peer careful": _variant("peer", 1.2, 0.995),
        "peer fast": _variant("peer", 1.8, 0.5),
        "peer faster": _variant("peer", 2.5, 0.1, failure="peer faster: exit 1: crashed"),  # made no model
    }
    rows = suite.glance_table([{"case": "mlp", "agreement_metric": "worst_cosine", "variants": variants}])
    assert rows[-1] == ("| mlp | worst_cosine | 1.50x (1.40-1.60) at 0.9900 | peer careful: 1.20x (1.10-1.30) at "
                        "0.9950 | peer fast: 1.80x (1.70-1.90) at 0.5000 |")


def test_a_long_failure_keeps_its_head_and_the_reason_at_its_end():
    failure = "inc tune: exit 1: " + "[WARNING] Skip the verified config mapping. | " * 20 + "found nothing within --max-drop"
    cell = suite.failure_cell(failure, 200)
    assert cell.startswith("inc tune: exit 1: ") and cell.endswith("found nothing within --max-drop (the JSON has it all)")
    assert len(cell) < 260 and suite.failure_cell("short", 200) == "short"
