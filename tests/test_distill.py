"""distill: trains a compressed model's weights towards the original's outputs and writes them back into the same
graph; judged on held-out samples, with the budget checked after it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from graph_checks import constant, held_out_cosine, make_model, value_info

from onnxforge import optimize

pytest.importorskip("torch")

from onnxforge.distill.augment import Augmenter  # noqa: E402

PRUNE = "prune:ratio=0.5:measure=false:recover=true"
DISTILL = "distill:steps=60:batch=4:lr=1e-2"


def _deep_mlp(seed: int = 0, width: int = 64, depth: int = 4) -> onnx.ModelProto:
    """x[N, 32] -> (MatMul, Add, Relu) x depth -> MatMul, Add -> y[N, 10]."""
    rng = np.random.default_rng(seed)
    nodes, initializers, x = [], [], "x"
    dims = [32] + [width] * depth + [10]
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        last = i == len(dims) - 2
        initializers += [
            constant(f"w{i}", (rng.standard_normal((a, b)) * 1.5 / np.sqrt(a)).astype(np.float32)),
            constant(f"b{i}", (rng.standard_normal(b) * 0.1).astype(np.float32)),
        ]
        nodes += [
            onnx.helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
            onnx.helper.make_node("Add", [f"m{i}", f"b{i}"], ["y" if last else f"a{i}"], name=f"bias{i}"),
        ]
        if not last:
            nodes.append(onnx.helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    return make_model(nodes, [value_info("x", ["n", 32])], [value_info("y", ["n", 10])], initializers)


def _samples(count: int = 32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(count)]


def _structure(model) -> list[tuple]:
    proto = model.to_proto()
    nodes = [(n.op_type, n.name, list(n.input), list(n.output), [str(a) for a in n.attribute]) for n in proto.graph.node]
    return [nodes, [i.name for i in proto.graph.input], [o.name for o in proto.graph.output],
            [(o.domain, o.version) for o in proto.opset_import]]  # fmt: skip


def test_distillation_wins_back_held_out_accuracy_that_recovery_alone_leaves_and_keeps_the_graph():
    source, samples = _deep_mlp(), _samples()
    recovered, _ = optimize(source, PRUNE, data=samples, budget="none", seed=0)
    distilled, report = optimize(source, f"{PRUNE},{DISTILL}", data=samples, budget="none", seed=0)
    prune, distill = report.passes
    assert distill.status == "applied", distill.notes
    assert distill.stats["held_out_error_after"] < distill.stats["held_out_error_before"]
    assert held_out_cosine(source, distilled, samples) > held_out_cosine(source, recovered, samples)
    assert _structure(distilled) == _structure(recovered)  # the same nodes, names, inputs, outputs and opsets
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in recovered.to_proto().graph.initializer}
    trained = {t.name: onnx.numpy_helper.to_array(t) for t in distilled.to_proto().graph.initializer}
    assert weights.keys() == trained.keys()
    assert any(not np.array_equal(weights[name], trained[name]) for name in weights)


def test_lossy_passes_before_distill_are_judged_against_the_budget_after_it():
    source, samples = _deep_mlp(), _samples()
    model, report = optimize(source, f"{PRUNE},{DISTILL}", data=samples, budget="cosine=0.5", seed=0)
    prune, distill = report.passes
    assert prune.status == "applied" and not prune.budget  # its full ratio, judged after distill
    assert "held-out --data samples" in distill.budget and not distill.budget.endswith("stepped back")
    assert held_out_cosine(source, model, samples) >= 0.5

    model, report = optimize(source, f"{PRUNE},{DISTILL}", data=samples, budget="cosine=0.9999", seed=0)
    prune, distill = report.passes
    assert prune.status == "rolled_back" and distill.budget.endswith("stepped back")
    assert held_out_cosine(source, model, samples) == pytest.approx(1.0, abs=1e-6)


def test_distill_with_nothing_lost_before_it_leaves_the_model():
    model, report = optimize(_deep_mlp(), DISTILL, data=_samples(8), seed=0)
    [record] = report.passes
    assert record.status == "unchanged" and "nothing to win back" in record.notes[0]


def test_distill_without_data_is_one_error_line(tmp_path):
    onnx.save(_deep_mlp(), tmp_path / "m.onnx")
    run = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", str(tmp_path / "m.onnx"), "--passes",
         f"prune:measure=false,{DISTILL}", "-o", str(tmp_path / "out.onnx"), "--budget", "none"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "error: distill trains on sample inputs: give them with --data (data= in the Python API)"
    )
    assert not (tmp_path / "out.onnx").exists()


def test_perturbed_copies_keep_every_shape_and_type_and_tokens_stay_in_the_vocabulary():
    rng = np.random.default_rng(0)
    samples = [
        {
            "input_ids": rng.integers(100, 140, (1, 12)).astype(np.int64),
            "attention_mask": np.ones((1, 12), np.int64),
            "audio": rng.standard_normal((1, 4000)).astype(np.float32),
            "image": rng.random((1, 3, 16, 16)).astype(np.float32),
            "state": rng.standard_normal((2, 1, 8)).astype(np.float32),
            "sr": np.array(16000, np.int64),
        }
        for _ in range(4)
    ]
    augmenter = Augmenter(samples, seed=0)
    assert augmenter.kinds == {
        "input_ids": "tokens", "attention_mask": "fixed", "audio": "audio", "image": "image", "state": "float",
        "sr": "fixed",
    }  # fmt: skip
    seen = np.unique(np.concatenate([s["input_ids"].ravel() for s in samples]))
    for _ in range(20):
        copy = augmenter.draw()
        for name, value in samples[0].items():
            assert copy[name].shape == value.shape and copy[name].dtype == value.dtype, name
        assert np.isin(copy["input_ids"], seen).all()
        assert (copy["attention_mask"] == 1).all() and copy["sr"] == 16000
    assert not np.array_equal(augmenter.draw()["audio"], samples[0]["audio"])


def test_the_auto_loss_matches_distributions_by_kl_divergence_and_other_outputs_by_relative_error():
    from onnxforge.distill.training import output_error

    rng = np.random.default_rng(0)
    logits_t, logits_s = rng.standard_normal((2, 5, 7)), rng.standard_normal((2, 5, 7))
    log_t = logits_t - np.log(np.exp(logits_t).sum(-1, keepdims=True))
    log_s = logits_s - np.log(np.exp(logits_s).sum(-1, keepdims=True))
    kl = float(np.mean(np.sum(np.exp(log_t) * (log_t - log_s), -1)))
    assert output_error({"y": log_s.astype(np.float32)}, {"y": log_t.astype(np.float32)}) == pytest.approx(kl, 1e-4)
    probabilities = np.exp(log_s).astype(np.float32), np.exp(log_t).astype(np.float32)
    assert output_error({"y": probabilities[0]}, {"y": probabilities[1]}) == pytest.approx(kl, 1e-3)
    relative = float(np.sum((logits_s - logits_t) ** 2) / np.sum(logits_t**2))
    plain = output_error({"y": logits_s.astype(np.float32)}, {"y": logits_t.astype(np.float32)})
    assert plain == pytest.approx(relative, 1e-4)
