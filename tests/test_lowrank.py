"""lowrank: factors found by SVD (plain and whitened), the graph rewrite for MatMul, Gemm and Conv, rank choice."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graph_checks import apply, constant, make_model, max_rel_error, op_counts, padded_token_samples, value_info
from onnx import TensorProto, helper

from onnxforge.calibration.probes import replacement_errors
from onnxforge.errors import PassError
from onnxforge.ir import Model, infer_shapes, load_model
from onnxforge.pipeline.context import PassContext
from onnxforge.passes.layers import find_layers
from onnxforge.passes.lowrank.factorization import ranks_for_budget, spectrum
from onnxforge.passes.lowrank.lowrank import Candidate, as_candidate, factor_layer, spatial_candidate
from test_prune_pass import relative_error

RNG = np.random.default_rng(0)


def low_rank(m: int, n: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(m)).astype(np.float32)


def matmul_model(weight: np.ndarray, rows: int = 6) -> onnx.ModelProto:
    m, n = weight.shape
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [value_info("x", [rows, m])],
        [value_info("y", [rows, n])],
        [constant("w", weight)],
    )


def gemm_model(weight_t: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """Gemm with transB=1: the weight is stored [outputs, inputs], as torch's Linear exports it."""
    n, m = weight_t.shape
    return make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        [value_info("x", [4, m])],
        [value_info("y", [4, n])],
        [constant("w", weight_t), constant("b", bias)],
    )


def conv_model(weight: np.ndarray, size: int = 12, **attrs) -> onnx.ModelProto:
    out_channels, in_channels, kh, kw = weight.shape
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)],
        [value_info("x", [1, in_channels, size, size])],
        [value_info("y", None)],
        [constant("w", weight), constant("b", RNG.standard_normal(out_channels).astype(np.float32))],
    )
    return onnx.shape_inference.infer_shapes(model)


def test_a_low_rank_weight_is_recovered_exactly_at_its_true_rank():
    source = matmul_model(low_rank(96, 80, 5))
    model, result = apply("lowrank:rank=5:measure=false", source)
    assert result.changed and op_counts(model)["MatMul"] == 2
    assert "rank 5 of 80 (weight energy 1.000)" in result.notes[0]
    assert max_rel_error(source, model) < 1e-4
    # Asked for nearly all of the energy, the pass finds the true rank itself.
    _, by_energy = apply("lowrank:energy=0.999999:measure=false", source)
    assert "rank 5 of 80" in by_energy.notes[0]


def test_gemm_keeps_its_bias_on_the_second_factor():
    source = gemm_model(low_rank(64, 96, 6).T.copy(), RNG.standard_normal(96).astype(np.float32))
    model, result = apply("lowrank:rank=6:measure=false", source)
    assert op_counts(model)["Gemm"] == 2 and max_rel_error(source, model) < 1e-4


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}, {"dilations": [2, 2]}])
def test_a_conv_of_low_channel_rank_becomes_a_thin_conv_and_a_pointwise_one(attrs):
    rank, out_channels, in_channels = 4, 48, 32
    weight = low_rank(out_channels, in_channels * 9, rank).reshape(out_channels, in_channels, 3, 3)
    source = conv_model(weight, **attrs)
    model, result = apply(f"lowrank:rank={rank}:measure=false", source)
    first, second = [n for n in model.graph.nodes if n.op == "Conv"]
    assert first.inputs[1].shape == (rank, in_channels, 3, 3) and second.inputs[1].shape == (out_channels, rank, 1, 1)
    assert max_rel_error(source, model) < 1e-4


ONE_LAYER_MODELS = pytest.mark.parametrize(
    "source",
    [
        matmul_model(RNG.standard_normal((24, 16)).astype(np.float32)),
        gemm_model(RNG.standard_normal((16, 24)).astype(np.float32), RNG.standard_normal(16).astype(np.float32)),
        conv_model(RNG.standard_normal((8, 6, 3, 3)).astype(np.float32), strides=[2, 2], pads=[1, 0, 1, 0]),
    ],
    ids=["matmul", "gemm", "conv"],
)


def only_candidate(source: onnx.ModelProto) -> tuple[Model, Candidate]:
    """The model, shapes inferred, and the candidate of its one layer."""
    model = load_model(source)
    infer_shapes(model)
    [layer] = find_layers(model.graph)
    return model, as_candidate(layer)


@ONE_LAYER_MODELS
def test_at_full_rank_the_factored_graph_computes_the_same_function(source):
    """The rewrite itself is exact: at full rank (which the pass would not choose: it saves nothing)."""
    model, candidate = only_candidate(source)
    candidate.spectrum = spectrum(candidate.matrix)
    factor_layer(model, candidate, candidate.spectrum.full_rank)
    assert len(model.graph.nodes) == 2 and max_rel_error(source, model) < 1e-4


def correlated_samples(count: int, width: int, seed: int) -> list[dict]:
    """Inputs that live near an 8-dimensional subspace, as real activations do."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((8, width))
    return [
        {"x": (rng.standard_normal((6, 8)) @ mixing + 0.05 * rng.standard_normal((6, width))).astype(np.float32)}
        for _ in range(count)
    ]


def test_whitened_svd_keeps_the_outputs_much_better_than_plain_svd_on_correlated_inputs():
    source = matmul_model(RNG.standard_normal((64, 64)).astype(np.float32) / 8)
    calibration, held_out = correlated_samples(32, 64, seed=1), correlated_samples(8, 64, seed=2)
    plain, _ = apply("lowrank:rank=8:measure=false", source, data=calibration)
    whitened, result = apply("lowrank:rank=8:method=whitened:measure=false", source, data=calibration)
    assert "output energy" in result.notes[0] and "on --data" in result.notes[0]
    plain_error, whitened_error = relative_error(source, plain, held_out), relative_error(source, whitened, held_out)
    assert whitened_error < 0.5 * plain_error, (whitened_error, plain_error)


def test_recovery_refits_the_second_factor_to_the_old_outputs():
    source = matmul_model(RNG.standard_normal((64, 64)).astype(np.float32) / 8)
    calibration, held_out = correlated_samples(32, 64, seed=3), correlated_samples(8, 64, seed=4)
    plain, _ = apply("lowrank:rank=6:measure=false", source, data=calibration)
    recovered, result = apply("lowrank:rank=6:recover=true:measure=false", source, data=calibration)
    assert any(note.startswith("recovery: 1 of 1") for note in result.notes)
    assert relative_error(source, recovered, held_out) < relative_error(source, plain, held_out)


def test_a_parameter_budget_gives_the_rank_to_the_layer_that_needs_it():
    spectra = [spectrum(low_rank(64, 64, 2, seed=1)), spectrum(low_rank(64, 64, 16, seed=2))]
    ranks = ranks_for_budget(spectra, [(64, 64), (64, 64)], 0.25)  # 2 * 64 * 64 / 4 = 2048 = 16 ranks of 128
    assert sum(ranks) * 128 <= 2048 and ranks[1] > ranks[0] >= 1


def test_layers_that_would_not_get_smaller_are_kept_and_named():
    source = matmul_model(RNG.standard_normal((96, 80)).astype(np.float32))
    model, result = apply("lowrank:energy=0.99:measure=false", source)
    assert not result.changed and "kept: rank" in result.notes[0]
    assert max_rel_error(source, model) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lowrank:rank=4:energy=0.9", "give one of rank=, energy= and ratio="),
        ("lowrank:ratio=1.5", "fractions from 0 to 1"),
        ("lowrank:method=whitened", "give them with --data"),
    ],
)
def test_bad_options_are_refused_with_one_line(spec, message):
    with pytest.raises(PassError, match=message):
        apply(spec, matmul_model(low_rank(96, 80, 5)))


def spatially_separable(out_channels: int, in_channels: int, rank: int, seed: int = 0) -> np.ndarray:
    """W[o, c, i, j] = sum_k V[k, c, i] H[o, k, j]: a 3 x 1 Conv of `rank` filters, then a 1 x 3 Conv."""
    rng = np.random.default_rng(seed)
    vertical, horizontal = rng.standard_normal((rank, in_channels, 3)), rng.standard_normal((out_channels, rank, 3))
    return np.einsum("kci,okj->ocij", vertical, horizontal).astype(np.float32) / in_channels


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 1], "pads": [1, 1, 1, 1]}, {"dilations": [1, 2]}])
def test_a_spatially_separable_conv_becomes_a_vertical_and_a_horizontal_conv_where_that_is_cheaper(attrs):
    source = conv_model(spatially_separable(32, 24, 3), size=16, **attrs)
    model, result = apply("lowrank:rank=3:measure=false", source)
    first, second = [n for n in model.graph.nodes if n.op == "Conv"]
    assert first.inputs[1].shape == (3, 24, 3, 1) and second.inputs[1].shape == (32, 3, 1, 3)
    assert max_rel_error(source, model) < 1e-4


def test_the_spatial_rewrite_is_exact_at_full_rank():
    source = conv_model(RNG.standard_normal((6, 5, 3, 3)).astype(np.float32), strides=[2, 2], pads=[1, 0, 1, 1])
    model, candidate = only_candidate(source)
    spatial = spatial_candidate(candidate)
    factor_layer(model, spatial, spatial.spectrum.full_rank)
    assert max_rel_error(source, model) < 1e-4


def two_branch_model(width: int = 64, louder: float = 8.0) -> onnx.ModelProto:
    """y = louder * (x @ W1) + x @ W2: the same kind of weights, but W1's errors reach the output `louder` times."""
    rng = np.random.default_rng(5)
    w1, w2 = (rng.standard_normal((width, width)).astype(np.float32) / 8 for _ in range(2))
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"], name="loud"),
            helper.make_node("Mul", ["h1", "gain"], ["g1"]),
            helper.make_node("MatMul", ["x", "w2"], ["h2"], name="quiet"),
            helper.make_node("Add", ["g1", "h2"], ["y"]),
        ],
        [value_info("x", [6, width])],
        [value_info("y", [6, width])],
        [constant("w1", w1), constant("gain", np.array(louder, np.float32)), constant("w2", w2)],
    )


def graded_samples(count: int, width: int, seed: int) -> list[dict]:
    """Inputs whose variance falls off steadily over a fixed basis: every rank keeps a little more."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(98).standard_normal((width, width)))[0]
    scales = 0.93 ** np.arange(width)
    return [{"x": (rng.standard_normal((6, width)) * scales @ basis.T).astype(np.float32)} for _ in range(count)]


def energy_allocation(source: onnx.ModelProto, calibration: list[dict], ratio: float):
    """`source` factored by whitened SVD at ranks from each layer's relative output energy (the plain budget)."""
    model = load_model(source)
    infer_shapes(model)
    candidates = [as_candidate(layer) for layer in find_layers(model.graph)]
    x = np.concatenate([sample["x"] for sample in calibration]).astype(np.float64)
    for candidate in candidates:
        candidate.spectrum = spectrum(candidate.matrix, x.T @ x / len(x))
    ranks = ranks_for_budget([c.spectrum for c in candidates], [c.shape for c in candidates], ratio)
    for candidate, rank in zip(candidates, ranks):
        factor_layer(model, candidate, rank)
    return model, ranks


def test_a_budget_spent_by_output_error_beats_one_spent_by_energy_on_held_out_samples():
    source = two_branch_model()
    calibration, held_out = graded_samples(32, 64, seed=6), graded_samples(8, 64, seed=7)
    by_energy, energy_ranks = energy_allocation(source, calibration, 0.25)
    by_output, result = apply("lowrank:ratio=0.25:method=whitened:measure=false", source, data=calibration)
    assert any(note.startswith("ranks chosen by the model's output error on 8 held-out samples") for note in result.notes)
    loud, quiet = ([n for n in by_output.graph.nodes if n.name == name][0] for name in ("loud", "quiet"))
    assert loud.inputs[1].shape[0] > energy_ranks[0] and quiet.inputs[1].shape[0] < energy_ranks[1]
    # The same budget: 2 * 64 * 64 / 4 = 2048 parameters, 16 ranks of 128.
    factors = [n.inputs[1].values.size for n in by_output.graph.nodes if n.op == "MatMul"]
    assert len(factors) == 4 and sum(factors) <= 0.25 * 2 * 64 * 64
    error, energy_error = relative_error(source, by_output, held_out), relative_error(source, by_energy, held_out)
    assert error < 0.8 * energy_error, (error, energy_error)


def test_a_budget_keeps_a_layer_whole_rather_than_nearly_whole():
    spectra = [spectrum(low_rank(64, 64, 64, seed=3)), spectrum(low_rank(64, 64, 2, seed=4))]
    worth = [spectra[0].s**2 * 100, spectra[1].s**2]  # the first layer's values matter far more
    ranks = ranks_for_budget(spectra, [(64, 64), (64, 64)], 0.6, worth, max_kept=0.9)
    assert ranks[0] == 64 and 64 * 64 + ranks[1] * 128 <= 0.6 * 2 * 64 * 64
    # Without max_kept the rank would go past the point where factoring still saves anything.
    assert ranks_for_budget(spectra, [(64, 64), (64, 64)], 0.6, worth)[0] > 0.9 * 64 * 64 / 128


def test_replacing_a_weight_costs_its_share_of_the_outputs():
    source = two_branch_model(louder=1.0)
    model = load_model(source)
    samples = graded_samples(4, 64, seed=8)
    loud, quiet = find_layers(model.graph)
    zeros = np.zeros((64, 64), np.float32)
    [[same, none]] = replacement_errors(model, [loud], [[loud.weight.values, zeros]], samples, PassContext().calibration)
    assert same == 0 and none == pytest.approx(
        relative_error(source, matmul_model(quiet.weight.values), samples) ** 2, rel=1e-4
    )


@ONE_LAYER_MODELS
def test_a_candidate_stores_its_matrix_in_the_layout_of_the_weight(source):
    _, candidate = only_candidate(source)
    forms = [candidate] + ([spatial_candidate(candidate)] if candidate.layer.op == "Conv" else [])
    for form in forms:
        assert np.array_equal(form.stored(form.matrix), candidate.layer.weight.values)


def masked_tokens_model(width: int = 16, tokens: int = 12) -> onnx.ModelProto:
    """x [1, tokens, width] @ W, with an attention_mask input (also an output, so that the model reads it)."""
    weight = np.random.default_rng(9).standard_normal((width, width)).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        ],
        [value_info("x", [1, tokens, width]), value_info("attention_mask", [1, tokens], TensorProto.INT64)],
        [value_info("y", [1, tokens, width]), value_info("mask", [1, tokens])],
        [constant("w", weight)],
    )


def test_whitening_reads_only_the_tokens_the_attention_mask_marks_real():
    source = masked_tokens_model()
    samples, garbled = padded_token_samples(8, 16, seed=10)
    unmasked = [{"x": g["x"], "attention_mask": np.ones_like(g["attention_mask"])} for g in garbled]
    passes = "lowrank:rank=4:method=whitened:min_size=0:measure=false"
    factors = [_constants(apply(passes, source, data=data)[0]) for data in (samples, garbled, unmasked)]
    assert len(factors[0]) == 2 and all(np.allclose(a, b, atol=1e-5) for a, b in zip(factors[0], factors[1]))
    assert not np.allclose(factors[0][0], factors[2][0], atol=1e-2)  # the same values, all marked real, count


def _constants(model: Model) -> list[np.ndarray]:
    return [np.asarray(t.values) for t in model.graph.tensors().values() if isinstance(t, gs.Constant)]
