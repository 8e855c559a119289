"""The error budget's labels bound: the top-1 labels of the outputs a Softmax or LogSoftmax computes, which the
default budget keeps where cosine alone would let a quantization flip them."""

from __future__ import annotations

import html
import json

import numpy as np
import onnx
import pytest
from graph_checks import constant, make_model, value_info
from onnx import helper
from test_cli import OPTIMIZE, run_cli, succeeded

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.comparison import compare_outputs
from onnxforge.frontends.onnx import from_onnx
from onnxforge.pipeline.budget import DEFAULT_BUDGET, Budget
from onnxforge.report import render_html

CLASSES, LABELS, WIDTH = 10, 8, 16


def _scores_model(seed: int = 0) -> onnx.ModelProto:
    """x[N, T, 16] -> five outputs: `probs` [N, 10] (Softmax of the mean over T), `log_probs` [T, N, 8] (LogSoftmax
    then Transpose, its labels still last), `flat` [N*T, 8] (Softmax through Reshape), and three that are no scores:
    `embedding` [N, T, 4] (MatMul alone), `moved` [N, 8, T] (Softmax, then its label axis moved away from last) and
    `over_time` [N, T, 8] (Softmax over the frames, not the last axis)."""
    rng = np.random.default_rng(seed)
    weights = {name: rng.standard_normal((WIDTH, size)).astype(np.float32) for name, size in
               (("wc", CLASSES), ("wl", LABELS), ("we", 4))}  # fmt: skip
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "wc"], ["class_logits"]),
        helper.make_node("Softmax", ["class_logits"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["x", "wl"], ["frame_logits"]),
        helper.make_node("LogSoftmax", ["frame_logits"], ["frame_scores"], axis=-1),
        helper.make_node("Transpose", ["frame_scores"], ["log_probs"], perm=[1, 0, 2]),
        helper.make_node("Softmax", ["frame_logits"], ["frame_probs"], axis=-1),
        helper.make_node("Reshape", ["frame_probs", "flat_shape"], ["flat"]),
        helper.make_node("Transpose", ["frame_probs"], ["moved"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "we"], ["embedding"]),
        helper.make_node("Softmax", ["frame_logits"], ["over_time"], axis=1),
    ]
    outputs = [
        value_info("probs", ["n", CLASSES]), value_info("log_probs", ["t", "n", LABELS]),
        value_info("flat", ["nt", LABELS]), value_info("embedding", ["n", "t", 4]),
        value_info("moved", ["n", LABELS, "t"]), value_info("over_time", ["n", "t", LABELS]),
    ]  # fmt: skip
    initializers = [constant(name, value) for name, value in weights.items()]
    initializers.append(constant("flat_shape", np.array([-1, LABELS], np.int64)))
    return make_model(nodes, [value_info("x", ["n", "t", WIDTH])], outputs, initializers, opset=17)


def _near_tie_classifier(seed: int = 0) -> onnx.ModelProto:
    """x[N, 32] -> MatMul -> Relu -> MatMul -> Softmax -> probs[N, 10], whose two leading classes score almost alike
    on every input (their weight columns differ by a little noise): int8's rounding swaps them, while the
    probabilities, near 0.5 and 0.5, barely move."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((32, 64)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((64, CLASSES)) * 0.1).astype(np.float32)
    leading = np.abs(rng.standard_normal(64)).astype(np.float32)
    w2[:, 0], w2[:, 1] = leading, leading + rng.standard_normal(64).astype(np.float32) * 0.002
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return make_model(
        nodes, [value_info("x", ["n", 32])], [value_info("probs", ["n", CLASSES])], [constant("w1", w1),
        constant("w2", w2)],
    )  # fmt: skip


def _run(source: onnx.ModelProto, samples: list[dict]) -> list[dict]:
    session = get_backend("ort").prepare(source.SerializeToString())
    return [session.run(sample) for sample in samples]


def _bound(text: str, source: onnx.ModelProto, samples: list[dict]) -> tuple[Budget, list[dict]]:
    reference = _run(source, samples)
    return Budget.parse(text).bound_to(from_onnx(source), reference, samples), reference


def test_the_labels_bound_reads_softmax_and_log_softmax_outputs_through_data_moves_only():
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((3, 5, WIDTH)).astype(np.float32)} for _ in range(2)]
    budget, reference = _bound("labels=0.99", _scores_model(), samples)
    assert budget.scores == ("probs", "log_probs", "flat")
    assert budget.losses(reference, reference, samples) == {"labels": 0.0}
    assert budget.describe() == "labels>=0.99"


def test_labels_that_flip_break_the_bound_pooled_over_the_samples():
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((3, 5, WIDTH)).astype(np.float32)} for _ in range(2)]
    budget, reference = _bound("cosine=0.5,labels=0.95", _scores_model(), samples)
    candidate = [dict(run) for run in reference]
    first = candidate[0]["log_probs"].copy()  # [5, 3, 8]: 15 rows a sample, 30 in all
    first[0, 0] = first[0, 0, ::-1]  # the row's label moves (distinct log-probabilities)
    first[1, 2] = np.roll(first[1, 2], 1)
    first[2, 1] = np.roll(first[2, 1], 3)
    candidate[0]["log_probs"] = first
    losses = budget.losses(reference, candidate, samples)
    assert losses["labels"] == pytest.approx(3 / 30)
    assert losses["cosine"] < 0.5 and not budget.fits(losses)
    assert budget.figures(losses) == f"worst cosine {1 - losses['cosine']:.4f}, labels kept 0.9000"

    embedding = [dict(run, embedding=-run["embedding"]) for run in reference]  # no score output: no label to keep
    assert budget.losses(reference, embedding, samples)["labels"] == 0.0


def test_a_model_without_score_outputs_reads_no_loss_and_says_so():
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(2)]
    source = _near_tie_classifier()
    source.graph.output[0].name = "logits"  # the MatMul's output: scores before any Softmax
    del source.graph.node[-1]
    budget, reference = _bound(DEFAULT_BUDGET, source, samples)
    candidate = [{"logits": run["logits"][:, ::-1].copy()} for run in reference]
    assert budget.scores == ()
    assert budget.losses(reference, candidate, samples)["labels"] == 0.0
    assert "labels: no score output" in budget.figures(budget.losses(reference, candidate, samples))


def _held_out(samples: list[dict]) -> list[dict]:
    return samples[-len(samples) // 4 :]


def test_the_default_budget_rejects_a_quantization_that_keeps_cosine_but_flips_labels(tmp_path):
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(16)]
    source = _near_tie_classifier()
    held_out = _held_out(samples)

    def against_source(model) -> tuple[float, float]:
        comparison = compare_outputs(_run(source, held_out), [get_backend("ort").prepare(model).run(s) for s in held_out])
        return comparison.min_cosine, comparison.min_top1_agreement

    onnx.save(source, tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=np.stack([sample["x"] for sample in samples]))
    succeeded(run_cli(OPTIMIZE, tmp_path / "m.onnx", "--passes", "quant:measure=false", "--data", tmp_path / "data.npz",
                      "--budget", "cosine=0.99", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][0]["status"] == "applied" and report["budget"]["bounds"] == "cosine>=0.99"
    assert report["budget"]["score_outputs"] is None  # the labels bound is not given: no label is read
    cosine, agreement = against_source(str(tmp_path / "out.onnx"))
    assert cosine >= 0.99 and agreement < 0.9  # what cosine alone lets through

    model, report = optimize(source, "quant:measure=false", data=samples)
    assert report.budget["bounds"] == "cosine>=0.99, labels>=0.99" and report.budget["default"]
    assert report.budget["score_outputs"] == ["probs"] and report.budget["spent"]["labels"] <= 0.01
    assert against_source(model)[1] >= 0.99
    assert "labels read on probs" in report.summary()


def test_the_reports_show_the_labels_figure():
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(16)]
    _, report = optimize(_near_tie_classifier(), "quant:measure=false", data=samples, budget="cosine=0.99,labels=0.3")
    [record] = report.passes
    assert record.status == "applied" and ", labels kept 0." in record.budget
    page = html.unescape(render_html(report.to_dict()))
    assert record.budget in page and "labels read on probs" in page
