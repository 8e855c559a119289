"""Weight quantization: rtn and search within half a step, GPTQ and AdaRound below rtn, and the layouts onnxruntime
reads."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from graph_checks import apply, constant, make_model, op_counts, value_info
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import PassError, PassUsageError
from onnxforge.ir import Model
from onnxforge.passes.quantization.adaround import adaround
from onnxforge.passes.quantization.ranges import code_range
from onnxforge.passes.quantization.weights import (
    QuantizedWeight,
    QuantSpec,
    gptq_quantize,
    int4_tensor,
    pack_matmul_nbits,
    quantize_weight,
)

FLOAT = TensorProto.FLOAT

ALL_SPECS = [
    QuantSpec(bits, signed, symmetric, granularity, 32 if granularity == "block" else 0)
    for bits in (8, 4)
    for signed in (True, False)
    for symmetric in (True, False)
    for granularity in ("per-tensor", "per-channel", "block")
]


def _spec_id(spec: QuantSpec) -> str:
    return f"{'' if spec.signed else 'u'}int{spec.bits}-{'sym' if spec.symmetric else 'asym'}-{spec.granularity}"


def _assert_valid(q: QuantizedWeight, weight: np.ndarray) -> None:
    """Codes in range and of the code type, scales finite and positive, layouts as DequantizeLinear reads them."""
    spec = q.spec
    low, high = code_range(spec.bits, spec.signed, spec.symmetric)
    assert q.codes.shape == weight.shape and q.codes.dtype == (np.int8 if spec.signed else np.uint8)
    assert low <= q.codes.min() and q.codes.max() <= high
    assert q.zero_point.dtype == q.codes.dtype and q.zero_point.shape == q.scale.shape
    assert q.scale.dtype == np.float32 and np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
    if spec.symmetric:
        assert np.all(q.zero_point == (0 if spec.signed else 2 ** (spec.bits - 1)))
    if spec.granularity == "per-tensor":
        assert q.scale.shape == () and q.axis is None
    elif spec.granularity == "per-channel":
        assert q.scale.shape == (weight.shape[q.axis],)
    else:
        expected = list(weight.shape)
        expected[q.axis] = -(-weight.shape[q.axis] // spec.block_size)
        assert q.scale.shape == tuple(expected)


def _assert_within_half_a_step(q: QuantizedWeight, weight: np.ndarray) -> None:
    step = q.broadcast(q.scale)
    # Half a step, plus float32 rounding of the scale and of the codes times the scale.
    assert np.all(np.abs(q.dequantize() - weight) <= step / 2 * (1 + 1e-4) + 1e-30)


def _weighted_error(q: QuantizedWeight, weight: np.ndarray, input_energy: np.ndarray | None) -> float:
    squared = np.square(q.dequantize().astype(np.float64) - weight)
    return float(squared.sum() if input_energy is None else (input_energy[:, None] * squared).sum())


@pytest.mark.parametrize("spec", ALL_SPECS, ids=_spec_id)
@pytest.mark.parametrize(("shape", "axis"), [((80, 24), 0), ((80, 24), 1), ((8, 3, 5, 5), 0), ((8, 40, 3, 3), 1)])
def test_rtn_dequantizes_within_half_a_step(spec, shape, axis):
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    q = quantize_weight(weight, spec, axis)
    _assert_valid(q, weight)
    _assert_within_half_a_step(q, weight)


@settings(deadline=None, max_examples=60)
@given(
    spec=st.sampled_from(ALL_SPECS),
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple),
    axis_choice=st.integers(0, 2),
    magnitude=st.floats(1e-6, 1e6),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_weight_dequantizes_within_half_a_step(spec, shape, axis_choice, magnitude, seed):
    weight = (np.random.default_rng(seed).standard_normal(shape) * magnitude).astype(np.float32)
    q = quantize_weight(weight, spec, axis_choice % len(shape))
    _assert_valid(q, weight)
    _assert_within_half_a_step(q, weight)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=_spec_id)
def test_zero_channels_and_blocks_get_finite_scales_and_exact_zeros(spec):
    weight = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    weight[:, 2] = 0
    weight[:32, 4] = 0
    for method in ("rtn", "search"):
        q = quantize_weight(weight, spec, axis=1 if spec.granularity == "per-channel" else 0, method=method)
        _assert_valid(q, weight)
        assert np.all(q.dequantize()[weight == 0] == 0) and np.all(np.isfinite(q.dequantize()))
    all_zero = quantize_weight(np.zeros((64, 6), np.float32), spec, axis=0)
    assert np.all(all_zero.codes == all_zero.broadcast(all_zero.zero_point)) and not all_zero.dequantize().any()


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.granularity != "per-tensor"], ids=_spec_id)
@pytest.mark.parametrize("weighted", [False, True])
def test_search_is_never_worse_than_rtn(spec, weighted):
    rng = np.random.default_rng(0)
    weight = rng.standard_t(3, (96, 40)).astype(np.float32)  # heavy tails, where clipping pays
    energy = rng.uniform(0, 4, 96).astype(np.float32) ** 2 if weighted else None
    axis = 1 if spec.granularity == "per-channel" else 0
    rtn = quantize_weight(weight, spec, axis)
    searched = quantize_weight(weight, spec, axis, method="search", input_energy=energy)
    _assert_valid(searched, weight)
    assert _weighted_error(searched, weight, energy) <= _weighted_error(rtn, weight, energy)
    if spec.bits == 4:
        assert _weighted_error(searched, weight, energy) < 0.95 * _weighted_error(rtn, weight, energy)


@pytest.mark.slow
def test_search_quantizes_a_4096_square_weight_in_seconds():
    weight = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    started = time.perf_counter()
    quantize_weight(weight, QuantSpec(4, granularity="block", block_size=32), axis=0, method="search")
    assert time.perf_counter() - started < 10


def _output_error(inputs: np.ndarray, weight: np.ndarray, q: QuantizedWeight) -> float:
    return float(np.linalg.norm(inputs @ (weight - q.dequantize())))


def _correlated_inputs(rng: np.random.Generator, mixing: np.ndarray, samples: int) -> np.ndarray:
    """Inputs X = Z @ A: every input feature a random mix of a few latent ones."""
    return rng.standard_normal((samples, mixing.shape[0])) @ mixing


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_cuts_output_error_of_rtn_on_correlated_inputs(symmetric):
    rng = np.random.default_rng(0)
    features, outputs = 128, 32
    mixing = rng.standard_normal((features // 4, features))
    calibration = _correlated_inputs(rng, mixing, 1024)
    weight = rng.standard_normal((features, outputs)).astype(np.float32)
    spec = QuantSpec(4, signed=True, symmetric=symmetric, granularity="block", block_size=32)
    gptq = gptq_quantize(weight, calibration.T @ calibration, spec)
    rtn = quantize_weight(weight, spec, axis=0)
    _assert_valid(gptq, weight)
    fresh = _correlated_inputs(rng, mixing, 1024)
    assert _output_error(fresh, weight, gptq) < 0.8 * _output_error(fresh, weight, rtn)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(8, granularity="per-channel"), QuantSpec(4, symmetric=False, granularity="per-tensor")],
    ids=_spec_id,
)
def test_gptq_with_fixed_scales_keeps_them(spec):
    rng = np.random.default_rng(0)
    inputs = _correlated_inputs(rng, rng.standard_normal((16, 64)), 512)
    weight = rng.standard_normal((64, 8)).astype(np.float32)
    gptq = gptq_quantize(weight, inputs.T @ inputs, spec)
    rtn = quantize_weight(weight, spec, axis=1)
    _assert_valid(gptq, weight)
    assert np.array_equal(gptq.scale, rtn.scale) and gptq.axis == rtn.axis
    assert _output_error(inputs, weight, gptq) < _output_error(inputs, weight, rtn)


def test_gptq_zeroes_dead_inputs():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((256, 64))
    inputs[:, 5] = 0
    weight = rng.standard_normal((64, 8)).astype(np.float32)
    spec = QuantSpec(4, signed=False, symmetric=False, granularity="block", block_size=16)
    q = gptq_quantize(weight, inputs.T @ inputs, spec)
    _assert_valid(q, weight)
    assert not q.dequantize()[5].any() and np.all(np.isfinite(q.dequantize()))


def _hessian_error(hessian: np.ndarray, weight_matrix: np.ndarray, dequantized_matrix: np.ndarray) -> float:
    """tr(ΔWᵀ H ΔW): the expected squared output error of a weight [K, N] on inputs of second moment H."""
    delta = dequantized_matrix.astype(np.float64) - weight_matrix
    return float(np.einsum("kn,kn->", hessian @ delta, delta))


@pytest.mark.parametrize(
    ("spec", "axis"),
    [
        (QuantSpec(4, granularity="block", block_size=32), 0),
        (QuantSpec(4, symmetric=False, granularity="block", block_size=32), 0),
        (QuantSpec(8, granularity="per-channel"), 1),
        (QuantSpec(8, signed=False, symmetric=False, granularity="per-tensor"), 1),
    ],
    ids=lambda value: _spec_id(value) if isinstance(value, QuantSpec) else None,
)
def test_adaround_cuts_output_error_of_rtn_by_moving_codes_at_most_one_step(spec, axis):
    rng = np.random.default_rng(0)
    features, outputs = 80, 48  # 80 input features: the last block is short
    mixing = rng.standard_normal((features // 4, features))
    calibration = _correlated_inputs(rng, mixing, 1024)
    weight = rng.standard_normal((features, outputs)).astype(np.float32)
    hessian = calibration.T @ calibration
    rtn = quantize_weight(weight, spec, axis)
    rounded = adaround(weight, rtn, hessian, out_axis=1)
    _assert_valid(rounded, weight)
    assert np.array_equal(rounded.scale, rtn.scale) and np.array_equal(rounded.zero_point, rtn.zero_point)
    assert np.abs(rounded.codes.astype(np.int16) - rtn.codes).max() <= 1
    rtn_error = _hessian_error(hessian, weight, rtn.dequantize())
    assert _hessian_error(hessian, weight, rounded.dequantize()) < 0.7 * rtn_error
    fresh = _correlated_inputs(rng, mixing, 1024)
    assert _output_error(fresh, weight, rounded) < 0.8 * _output_error(fresh, weight, rtn)


def test_adaround_reads_a_conv_weight_as_its_patch_matrix():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)  # [O, C, kh, kw]: matrix [C kh kw, O]
    patches = _correlated_inputs(rng, rng.standard_normal((18, 72)), 512)
    hessian = patches.T @ patches
    rtn = quantize_weight(weight, QuantSpec(8, granularity="per-channel"), axis=0)
    rounded = adaround(weight, rtn, hessian, out_axis=0)
    _assert_valid(rounded, weight)
    matrix = weight.reshape(16, -1).T
    error = _hessian_error(hessian, matrix, rounded.dequantize().reshape(16, -1).T)
    assert error < 0.7 * _hessian_error(hessian, matrix, rtn.dequantize().reshape(16, -1).T)


def test_adaround_keeps_nearest_codes_when_the_inputs_are_silent():
    weight = np.random.default_rng(2).standard_normal((32, 8)).astype(np.float32)
    rtn = quantize_weight(weight, QuantSpec(4, granularity="block", block_size=32), axis=0)
    assert adaround(weight, rtn, np.zeros((32, 32)), out_axis=1) is rtn


def _mlp_on_correlated_inputs(seed: int) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """x [8, 64] -> MatMul -> Relu -> MatMul -> y [8, 32], and 16 samples of correlated x."""
    rng = np.random.default_rng(seed)
    w1, w2 = (rng.standard_normal(shape).astype(np.float32) * 0.1 for shape in ((64, 128), (128, 32)))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    inputs, outputs = [value_info("x", [8, 64])], [value_info("y", [8, 32])]
    model = make_model(nodes, inputs, outputs, [constant("w1", w1), constant("w2", w2)], opset=21)
    mixing = rng.standard_normal((64, 64))
    return model, [{"x": (rng.standard_normal((8, 64)) @ mixing).astype(np.float32)} for _ in range(16)]


def _relative_error(source: onnx.ModelProto, quantized: Model, samples: list[dict[str, np.ndarray]]) -> float:
    """‖y_quantized - y_float‖ / ‖y_float‖ over all of `samples`, both models run by onnxruntime."""
    sessions = [
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        for proto in (source, quantized.to_proto())
    ]
    reference, result = (np.concatenate([s.run(None, x)[0].ravel() for x in samples]) for s in sessions)
    return float(np.linalg.norm(result - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize(
    ("options", "weight_op"),
    [("bits=4", "MatMulNBits"), ("bits=8:mode=weight-only:format=qdq:granularity=per-channel", "DequantizeLinear")],
)
def test_adaround_pass_beats_round_to_nearest_on_held_out_samples(options, weight_op):
    source, data = _mlp_on_correlated_inputs(seed=0)
    held_out = data[-4:]  # the pass's split: the last quarter is never fitted on
    errors = {}
    for method in ("rtn", "adaround"):
        model, result = apply(f"quant:{options}:measure=false:weight_method={method}", source, data=data)
        assert result.stats["layers_quantized"] == 2 and op_counts(model)[weight_op] == 2
        errors[method] = _relative_error(source, model, held_out)
    assert errors["adaround"] < 0.95 * errors["rtn"]


def test_adaround_needs_data():
    source, _ = _mlp_on_correlated_inputs(seed=0)
    with pytest.raises(PassUsageError, match="weight_method=adaround.*--data"):
        apply("quant:bits=4:measure=false:weight_method=adaround", source)


def _run(
    node: onnx.NodeProto, initializers: list[onnx.TensorProto], inputs: dict[str, np.ndarray], opsets: dict[str, int]
) -> np.ndarray:
    """Run a one-node graph with output y in onnxruntime."""
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(name, FLOAT, value.shape) for name, value in inputs.items()],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.granularity == "block"], ids=_spec_id)
@pytest.mark.parametrize("rows", [64, 80])
def test_matmul_nbits_in_onnxruntime_multiplies_by_the_dequantized_weight(spec, rows):
    rng = np.random.default_rng(0)
    q = quantize_weight(rng.standard_normal((rows, 24)).astype(np.float32), spec, axis=0)
    packed, scales, zero_points = pack_matmul_nbits(q)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "scales", "zero_points"],
        ["y"],
        domain="com.microsoft",
        K=rows,
        N=24,
        bits=spec.bits,
        block_size=spec.block_size,
        accuracy_level=0,
    )
    initializers = [
        numpy_helper.from_array(packed, "b"),
        numpy_helper.from_array(scales, "scales"),
        numpy_helper.from_array(zero_points, "zero_points"),
    ]
    x = rng.standard_normal((5, rows)).astype(np.float32)
    y = _run(node, initializers, {"x": x}, {"": 21, "com.microsoft": 1})
    expected = x @ q.dequantize()
    assert np.max(np.abs(y - expected)) <= 1e-4 * np.max(np.abs(expected))


def _dequantize_linear_in_onnxruntime(q: QuantizedWeight) -> np.ndarray:
    def constant(name: str, values: np.ndarray) -> onnx.TensorProto:
        return int4_tensor(name, values, q.spec.signed) if q.spec.bits == 4 else numpy_helper.from_array(values, name)

    attributes = {} if q.axis is None else {"axis": q.axis}
    if q.spec.granularity == "block":
        attributes["block_size"] = q.spec.block_size
    node = helper.make_node("DequantizeLinear", ["codes", "scale", "zero_point"], ["y"], **attributes)
    initializers = [
        constant("codes", q.codes),
        numpy_helper.from_array(q.scale, "scale"),
        constant("zero_point", q.zero_point),
    ]
    return _run(node, initializers, {}, {"": 21})


@pytest.mark.parametrize("spec", ALL_SPECS, ids=_spec_id)
@pytest.mark.parametrize(("shape", "axis"), [((64, 12), 0), ((80, 12), 0), ((6, 40, 3, 3), 1)])
def test_dequantize_linear_in_onnxruntime_reads_the_layout(spec, shape, axis):
    if spec.granularity == "per-channel" and axis == 0:
        axis = 1  # a MatMul weight's channels are its columns
    q = quantize_weight(np.random.default_rng(0).standard_normal(shape).astype(np.float32), spec, axis)
    np.testing.assert_allclose(_dequantize_linear_in_onnxruntime(q), q.dequantize(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_int4_tensor_round_trips(signed):
    codes = np.arange(-8, 8, dtype=np.int8).reshape(4, 4) if signed else np.arange(16, dtype=np.uint8).reshape(4, 4)
    tensor = int4_tensor("w", codes, signed)
    assert tensor.data_type == (TensorProto.INT4 if signed else TensorProto.UINT4)
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int16), codes)
    assert numpy_helper.to_array(int4_tensor("zp", np.array(3, np.uint8), signed=False)).astype(int) == 3


@pytest.mark.parametrize(
    "options",
    [
        dict(bits=3),
        dict(granularity="block"),
        dict(granularity="block", block_size=48),
        dict(block_size=32),
        dict(granularity="rows"),
    ],
)
def test_bad_spec_is_a_pass_error(options):
    with pytest.raises(PassError):
        QuantSpec(**options)
