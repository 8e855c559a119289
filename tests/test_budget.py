"""The error budget: parsed from --budget, spent by lossy passes, never exceeded on the held-out samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_checks import constant, held_out_cosine, make_model, value_info

from onnxforge import optimize
from onnxforge.pipeline import Pass, PassResult
from onnxforge.pipeline.budget import DEFAULT_BUDGET, Budget, BudgetError, strongest_within

HIDDEN = 128


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N, 64] -> MatMul -> Relu -> MatMul -> y[N, 16], hidden channels of steadily falling importance, so that
    pruning more of them costs steadily more of the output."""
    rng = np.random.default_rng(seed)
    scale = np.exp(-np.arange(HIDDEN) / 24.0).astype(np.float32)
    w1 = (rng.standard_normal((64, HIDDEN)) * scale).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, 16)) * scale[:, None]).astype(np.float32)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        onnx.helper.make_node("Relu", ["h"], ["a"], name="relu"),
        onnx.helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
    ]
    return make_model(
        nodes, [value_info("x", ["n", 64])], [value_info("y", ["n", 16])], [constant("w1", w1), constant("w2", w2)]
    )


def _samples(count: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(count)]


def test_budgets_parse_and_describe_their_bounds():
    budget = Budget.parse("cosine=0.99, rel=0.05,top1=0.9,equal=1")
    assert budget.allowances == pytest.approx({"cosine": 0.01, "rel": 0.05, "top1": 0.1, "equal": 0.0})
    assert budget.describe() == "cosine>=0.99, rel<=0.05, top1>=0.9, equal>=1"
    assert Budget.parse("none") is None and Budget.parse(" None ") is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("cosine", "is not NAME=VALUE"),
        ("cosine=1.5", "from 0 to 1"),
        ("rel=-1", "0 or more"),
        ("speed=2", "unknown bound 'speed'"),
        ("metric=accuracy>=0.9", "write metric=FILE.py:FUNCTION>=BOUND"),
        ("metric=missing.py:f>=0.9", "no file missing.py"),
    ],
)
def test_a_budget_that_cannot_be_read_is_one_clear_error(text, says):
    with pytest.raises(BudgetError, match=says):
        Budget.parse(text)


def test_strongest_within_bisects_to_the_first_level_that_fits():
    tried = []

    def fits(level):
        tried.append(level)
        return level <= 3

    assert strongest_within([8, 7, 6, 5, 4, 3, 2, 1], fits) == (3, len(tried))
    assert len(tried) < 8
    assert strongest_within([8, 7], lambda level: False) == (None, 2)


def test_prune_spends_its_share_and_the_held_out_error_stays_inside_the_budget():
    source, samples = _mlp(), _samples()
    model, report = optimize(source, "prune:ratio=0.75:measure=false", data=samples, budget="cosine=0.9995")
    [record] = report.passes
    assert record.status == "applied"
    assert "the strongest of 8 settings within this pass's share of the budget" in record.notes[0]
    assert 0 < record.stats["channels_removed"] < 0.75 * HIDDEN
    assert "held-out --data samples" in record.budget
    assert held_out_cosine(source, model, samples) >= 0.9995
    assert report.budget["bounds"] == "cosine>=0.9995" and report.budget["spent"]["cosine"] <= 0.0005


def test_without_data_the_budget_bounds_the_random_input_check():
    source = _mlp()
    _, report = optimize(source, "prune:ratio=0.75:measure=false", seed=0)  # the default budget
    assert report.budget["measured_on"] == "8 random input sets" and report.budget["default"]
    assert report.error.min_cosine >= 0.99


def test_every_lossy_pass_gets_a_share_and_the_whole_pipeline_stays_inside():
    source, samples = _mlp(), _samples()
    model, report = optimize(
        source, "prune:ratio=0.75:measure=false,quant:measure=false", data=samples, budget="cosine=0.9995"
    )
    prune, quant = report.passes
    assert prune.status == "applied" and prune.stats["budget_spent"] <= 0.5 + 1e-6  # half the budget is prune's
    assert held_out_cosine(source, model, samples) >= 0.9995
    assert report.data_error.min_cosine >= 0.9995


def test_a_result_outside_the_budget_is_stepped_back_and_says_so():
    source, samples = _mlp(), _samples()
    model, report = optimize(source, "lowrank:rank=1:measure=false", data=samples, budget="cosine=0.9999")
    [record] = report.passes
    assert record.status == "unchanged"
    assert record.budget.endswith("stepped back") and "over the budget" in record.budget
    assert "budget cosine>=0.9999" in report.summary()
    assert held_out_cosine(source, model, samples) == pytest.approx(1.0, abs=1e-6)


def test_with_no_budget_a_large_change_is_a_warning_with_the_figure_and_what_to_pass():
    source, samples = _mlp(), _samples()
    _, report = optimize(source, "lowrank:rank=1:measure=false", data=samples, budget="none")
    assert report.passes[0].status == "applied" and not report.budget
    [warning] = report.warnings()
    assert "worst cosine 0." in warning and "--budget" in warning
    assert report.to_dict()["warnings"] == [warning]


METRIC = """
import numpy as np

def top_agreement(reference, candidate, sample):
    return float(np.mean(reference["y"].argmax(-1) == candidate["y"].argmax(-1)))

def broken(reference, candidate, sample):
    raise ValueError("no transcript")
"""


def test_a_metric_function_bounds_the_run_and_one_that_raises_ends_it_with_one_error_line(tmp_path):
    (tmp_path / "metrics.py").write_text(METRIC)
    source, samples = _mlp(), _samples()
    budget = f"metric={tmp_path / 'metrics.py'}:top_agreement>=0.97"
    _, report = optimize(source, "prune:ratio=0.75:measure=false", data=samples, budget=budget)
    assert report.budget["spent"]["metric"] <= 0.03 + 1e-9
    assert "top_agreement >= 0.97" in report.budget["bounds"]
    assert "samples: metrics.py:top_agreement fell by " in report.passes[0].budget  # the file by its name alone

    onnx.save(source, tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=np.stack([s["x"] for s in samples]))
    run = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", str(tmp_path / "m.onnx"), "--passes",
         "prune:measure=false", "--data", str(tmp_path / "data.npz"), "--budget", "metric=metrics.py:broken>=0.9",
         "-o", str(tmp_path / "out.onnx")],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: --budget metric metrics.py:broken raised ValueError")
    assert "Traceback" not in run.stderr and not (tmp_path / "out.onnx").exists()


def test_the_budget_comes_from_a_config_file_with_its_metric_beside_it(tmp_path):
    (tmp_path / "metrics.py").write_text(METRIC)
    (tmp_path / "run.toml").write_text('budget = "metric=metrics.py:top_agreement>=0.9,cosine=0.98"\n')
    from onnxforge.config import load_config

    config = load_config(tmp_path / "run.toml")
    assert Budget.parse(config.budget).metric.name == f"{tmp_path / 'metrics.py'}:top_agreement"


class _Restore(Pass):
    name = "restore"
    """Puts the teacher back: wins back everything the lossy passes before it lost."""

    recovers = True
    lossless = False

    def run(self, model, ctx):
        model.graph = ctx.teacher.copy().graph
        return PassResult(True)


class _Idle(Pass):
    name = "idle"
    """Wins back nothing."""

    recovers = True
    lossless = False

    def run(self, model, ctx):
        return PassResult(False)


def test_lossy_passes_before_a_recovering_pass_are_judged_after_it():
    source, samples = _mlp(), _samples()
    passes = ["lowrank:rank=1:measure=false", _Restore()]
    _, report = optimize(source, passes, data=samples, budget="cosine=0.9999")
    lowrank, restore = report.passes
    assert lowrank.status == "applied" and not lowrank.budget  # not judged alone: restore comes after it
    assert "against the original" in restore.budget and not restore.budget.endswith("stepped back")

    passes = ["lowrank:rank=1:measure=false", _Idle()]
    model, report = optimize(source, passes, data=samples, budget="cosine=0.9999")
    lowrank, idle = report.passes
    assert lowrank.status == "rolled_back" and "over the budget after" in lowrank.error
    assert idle.budget.endswith("stepped back")
    assert held_out_cosine(source, model, samples) == pytest.approx(1.0, abs=1e-6)


def test_the_report_json_carries_the_budget_and_each_pass_line(tmp_path):
    source, samples = _mlp(), _samples()
    _, report = optimize(source, "prune:ratio=0.5:measure=false", data=samples, budget="cosine=0.995,rel=0.2")
    saved = json.loads(json.dumps(report.to_dict(), default=str))
    assert saved["budget"]["bounds"] == "cosine>=0.995, rel<=0.2"
    assert saved["budget"]["measured_on"] == "4 held-out --data samples"
    assert saved["passes"][0]["budget"].startswith("budget cosine>=0.995, rel<=0.2 on 4 held-out --data samples")


def test_the_documented_default_is_the_default():
    text = Path(__file__).resolve().parents[1].joinpath("docs", "budget.md").read_text()
    assert f"`{DEFAULT_BUDGET}`" in text and "--budget none" in text
