"""calibration: the one split of the samples, the statistics of what layers read, and their cache."""

from __future__ import annotations

import gc
import weakref

import numpy as np
from graph_checks import constant, make_model, value_info
from onnx import helper

from onnxforge.calibration.statistics import channel_moments, input_moments
from onnxforge.ir import Model, load_model
from onnxforge.ir.layers import as_layer
from onnxforge.pipeline import PassContext

RNG = np.random.default_rng(0)
W1, W2 = RNG.standard_normal((6, 5)).astype(np.float32), RNG.standard_normal((5, 3)).astype(np.float32)
KERNEL = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)


def _mlp() -> Model:
    """y = relu(x @ W1) @ W2 on x [1, tokens, 6], with an attention_mask input that marks the real tokens."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_out"], to=1),
    ]
    inputs = [value_info("x", [1, "tokens", 6]), value_info("attention_mask", [1, "tokens"], 7)]
    outputs = [value_info("y", [1, "tokens", 3]), value_info("mask_out", [1, "tokens"])]
    return load_model(make_model(nodes, inputs, outputs, [constant("w1", W1), constant("w2", W2)]))


def _conv() -> Model:
    """A 3x3 Conv of stride 2 and padding 1 on x [1, 2, 7, 7]."""
    node = helper.make_node("Conv", ["x", "k"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])
    return load_model(
        make_model([node], [value_info("x", [1, 2, 7, 7])], [value_info("y", [1, 4, 4, 4])], [constant("k", KERNEL)])
    )


def _token_samples(count: int, tokens: int = 8) -> list[dict]:
    rng = np.random.default_rng(1)
    samples = []
    for real in rng.integers(2, tokens, size=count):
        mask = (np.arange(tokens) < real).astype(np.int64)[None]
        samples.append({"x": rng.standard_normal((1, tokens, 6)).astype(np.float32), "attention_mask": mask})
    return samples


def _layers(model: Model, op: str) -> list:
    return [layer for layer in map(as_layer, model.graph.nodes) if layer is not None and layer.op == op]


def test_every_pass_splits_the_samples_the_same_way():
    for count, held in ((4, 1), (10, 2), (14, 4), (40, 10)):
        samples = _token_samples(count)
        fit, held_out = PassContext(data=samples).calibration.split()
        assert len(held_out) == held and all(a is b for a, b in zip(fit + held_out, samples, strict=True))
    few = _token_samples(3)
    assert PassContext(data=few).calibration.split() == (few, few)  # nothing to spare: both parts are all of them
    assert PassContext().calibration.samples == [] and PassContext().calibration.split() == ([], [])


def test_input_moments_are_the_gram_of_every_row_a_matmul_reads():
    model, samples = _mlp(), _token_samples(3)
    calibration = PassContext(data=samples).calibration
    first, second = _layers(model, "MatMul")
    [moment] = input_moments(model, [first], samples, calibration)
    rows = np.concatenate([s["x"].reshape(-1, 6) for s in samples]).astype(np.float64)
    np.testing.assert_allclose(moment.gram, rows.T @ rows, rtol=1e-12)
    assert moment.rows == len(rows) and np.allclose(moment.mean, rows.T @ rows / len(rows))
    # Drawn rows count only the real tokens; with the bias column, a trailing 1 (here no bias: the same width).
    [drawn] = input_moments(model, [second], samples, calibration, rows_per_sample=100, seed=3, bias=True)
    assert drawn.rows == sum(int(s["attention_mask"].sum()) for s in samples) and drawn.gram.shape == (5, 5)


def test_input_moments_of_a_conv_are_those_of_its_input_patches():
    model = _conv()
    samples = [{"x": RNG.standard_normal((1, 2, 7, 7)).astype(np.float32)} for _ in range(2)]
    calibration = PassContext(data=samples).calibration
    [moment] = input_moments(model, _layers(model, "Conv"), samples, calibration)
    assert moment.rows == 2 * 4 * 4 and moment.gram.shape == (2 * 3 * 3, 2 * 3 * 3)
    # The patches times the kernel give the Conv's output, so the Gram matrix gives its energy.
    matrix = KERNEL.reshape(4, -1).T.astype(np.float64)
    outputs = [calibration.runner(model)(sample)["y"] for sample in samples]
    energy = sum(float(np.sum(np.square(y, dtype=np.float64))) for y in outputs)
    assert np.isclose(np.trace(matrix.T @ moment.gram @ matrix), energy, rtol=1e-5)


def test_channel_moments_read_only_the_real_tokens():
    model, samples = _mlp(), _token_samples(4)
    calibration = PassContext(data=samples).calibration
    moments = channel_moments(model, {"x": -1}, samples, calibration)["x"]
    real = np.concatenate([s["x"][0][s["attention_mask"][0] == 1] for s in samples]).astype(np.float64)
    np.testing.assert_allclose(moments.abs_mean, np.abs(real).mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.square_mean, np.square(real).mean(0), rtol=1e-12)


def test_statistics_are_computed_once_per_model_and_sample_set_until_the_model_changes():
    model, samples = _mlp(), _token_samples(6)
    ctx = PassContext(data=samples)
    calibration, layers = ctx.calibration, _layers(model, "MatMul")
    first = input_moments(model, layers, samples, calibration, rows_per_sample=4)
    assert input_moments(model, layers, list(samples), calibration, rows_per_sample=4) is first  # same samples
    assert input_moments(model, layers, samples[:4], calibration, rows_per_sample=4) is not first
    assert input_moments(model, layers, samples, calibration, rows_per_sample=4, seed=1) is not first
    moments = channel_moments(model, {"x": -1}, samples, calibration)
    assert channel_moments(model, {"x": -1}, samples, calibration) is moments
    assert channel_moments(model.copy(), {"x": -1}, samples, calibration) is not moments  # another graph
    ctx.invalidate()  # what the pass manager does after a pass changed the model
    again = input_moments(model, layers, samples, calibration, rows_per_sample=4)
    assert again is not first and all(np.array_equal(a.gram, b.gram) for a, b in zip(again, first))


def test_statistics_of_a_graph_that_is_gone_are_forgotten():
    samples = _token_samples(2)
    calibration = PassContext(data=samples).calibration
    work = _mlp()  # a pass's working copy
    [moment, _] = input_moments(work, _layers(work, "MatMul"), samples, calibration)
    held = weakref.ref(moment)
    del work, moment
    gc.collect()
    assert held() is None  # the cache let go of it with the graph
