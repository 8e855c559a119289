"""lowrank: factors found by SVD (plain and whitened), the graph rewrite for MatMul, Gemm and Conv, rank choice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_checks import apply, constant, make_model, max_rel_error, op_counts, value_info
from onnx import helper

from onnxforge.errors import PassError
from onnxforge.ir import infer_shapes, load_model
from onnxforge.passes.layers import find_layers
from onnxforge.passes.lowrank.factorization import ranks_for_budget, spectrum
from onnxforge.passes.lowrank.lowrank import as_candidate, factor_layer, spatial_candidate
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


@pytest.mark.parametrize(
    "source",
    [
        matmul_model(RNG.standard_normal((24, 16)).astype(np.float32)),
        gemm_model(RNG.standard_normal((16, 24)).astype(np.float32), RNG.standard_normal(16).astype(np.float32)),
        conv_model(RNG.standard_normal((8, 6, 3, 3)).astype(np.float32), strides=[2, 2], pads=[1, 0, 1, 0]),
    ],
    ids=["matmul", "gemm", "conv"],
)
def test_at_full_rank_the_factored_graph_computes_the_same_function(source):
    """The rewrite itself is exact: at full rank (which the pass would not choose: it saves nothing)."""
    model = load_model(source)
    infer_shapes(model)
    [layer] = find_layers(model.graph)
    candidate = as_candidate(layer)
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
    model = load_model(source)
    infer_shapes(model)
    [layer] = find_layers(model.graph)
    spatial = spatial_candidate(as_candidate(layer))
    factor_layer(model, spatial, spatial.spectrum.full_rank)
    assert max_rel_error(source, model) < 1e-4
