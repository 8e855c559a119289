"""quant: each mode and form on small graphs, shared weights, calibration wiring, error budget, measured choice."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_checks import apply, constant, make_model, max_rel_error, op_counts, value_info
from onnx import TensorProto, helper

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.errors import PassError
from onnxforge.ir import Model, load_model
from onnxforge.measure import InterleavedTiming
from onnxforge.passes.quantization.sensitivity import RANKING_SAMPLES
from onnxforge.pipeline import PassContext, PassManager, create_passes

RNG = np.random.default_rng(0)
W1 = (RNG.standard_normal((64, 128)) * 0.1).astype(np.float32)
W2 = (RNG.standard_normal((128, 32)) * 0.1).astype(np.float32)


def _mlp(opset: int = 21) -> onnx.ModelProto:
    """x [8, 64] -> MatMul W1 -> Relu -> MatMul W2 -> y [8, 32]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
    ]
    return make_model(
        nodes, [value_info("x", [8, 64])], [value_info("y", [8, 32])], [constant("W1", W1), constant("W2", W2)], opset
    )


def _conv_net() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool on 1 x 16 x 12 x 12."""
    w1 = (RNG.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)
    w2 = (RNG.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32)
    b1, b2 = (RNG.standard_normal(32) * 0.1).astype(np.float32), (RNG.standard_normal(32) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["y"]),
    ]
    initializers = [constant("w1", w1), constant("b1", b1), constant("w2", w2), constant("b2", b2)]
    return make_model(nodes, [value_info("x", [1, 16, 12, 12])], [value_info("y", [1, 32, 1, 1])], initializers, 17)


def _samples(shape, count, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(count)]


def _initializer_types(model: Model) -> list[int]:
    return [t.data_type for t in model.to_proto().graph.initializer]


def test_dynamic_int8_writes_onnxruntimes_integer_kernel_and_stays_close():
    model, result = apply("quant:measure=false", _mlp())
    assert result.changed and result.stats["layers_quantized"] == 2
    assert op_counts(model)["DynamicQuantizeMatMul"] == 2
    # int8 per-channel weights and dynamic uint8 activations: about 1% of the output scale here.
    assert max_rel_error(_mlp(), model) < 0.03


@pytest.mark.parametrize("seven_bit", [False, True])
def test_int8_weights_keep_to_7_bits_where_the_cpus_integer_kernels_would_overflow(seven_bit):
    from onnxforge.passes.quantization.candidates import CandidateBuilder, WeightQuantizer, numbered_layers
    from onnxforge.passes.quantization.ranges import code_range
    from onnxforge.passes.quantization.rewrite import LayerFormat
    from onnxforge.passes.quantization.weights import QuantSpec

    assert code_range(8, True, True, seven_bit=True) == (-63, 63) and code_range(8, True, False, True) == (-64, 63)
    model = load_model(_mlp())
    builder = CandidateBuilder(model, WeightQuantizer("rtn"), {}, contrib_ops=True, seven_bit_weights=seven_bit)
    dynamic = LayerFormat("dynamic", "qoperator", QuantSpec(8, True, True, "per-channel"))
    built = builder.build(dict.fromkeys(numbered_layers(model), dynamic))
    codes = [t.values for t in built.graph.tensors().values() if getattr(t, "values", None) is not None
             and t.values.dtype == np.int8 and t.values.ndim == 2]
    assert len(codes) == 2 and max(int(np.abs(c).max()) for c in codes) == (63 if seven_bit else 127)
    # On a CPU whose kernels overflow with 8 bits (x86 without VNNI), only 7 bits keep the outputs close.
    if seven_bit or not get_backend("ort").capabilities.seven_bit_int8_weights:
        assert max_rel_error(_mlp(), built) < 0.03


def test_quant_keeps_7_bit_weights_as_the_backend_says_and_notes_it():
    model, result = apply("quant:measure=false", _mlp())
    seven_bit = get_backend("ort").capabilities.seven_bit_int8_weights
    assert any(note.startswith("int8 weights of integer kernels kept to 7 bits") for note in result.notes) == seven_bit


def test_dynamic_int8_qdq_is_standard_onnx_that_onnxruntime_fuses(tmp_path):
    model, result = apply("quant:measure=false:format=qdq", _mlp())
    counts = op_counts(model)
    assert counts["DynamicQuantizeLinear"] == 2 and counts["DequantizeLinear"] == 4 and counts["MatMul"] == 2
    assert _initializer_types(model).count(TensorProto.INT8) == 2  # the codes: symmetric zero points are 0
    assert max_rel_error(_mlp(), model) < 0.03
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    # onnxruntime 1.32 fuses the second MatMul; the first, followed by Relu, it leaves unfused (why the
    # default on onnxruntime is the qoperator form).
    assert "DynamicQuantizeMatMul" in ops


def test_dynamic_qoperator_writes_standard_integer_ops_for_other_backends():
    portable, _ = apply("quant:measure=false:format=qoperator", _mlp(), backend="tvm")
    counts = op_counts(portable)
    assert counts["MatMulInteger"] == 2 and counts["DynamicQuantizeLinear"] == 2
    assert all(node.domain in (None, "") for node in portable.graph.nodes)
    # onnx's reference evaluator: the integer arithmetic as written, not onnxruntime's kernels of this CPU (with
    # 8-bit weights, those of an x86 CPU without VNNI overflow: quant keeps 7 bits when it targets onnxruntime).
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    [expected] = ReferenceEvaluator(_mlp()).run(None, {"x": x})
    [got] = ReferenceEvaluator(portable.to_proto()).run(None, {"x": x})
    assert np.abs(got - expected).max() / np.abs(expected).max() < 0.03


@pytest.mark.parametrize("form, op", [("qoperator", "MatMulNBits"), ("qdq", "DequantizeLinear")])
def test_int4_weight_only_in_blocks(form, op):
    model, result = apply(f"quant:bits=4:measure=false:format={form}", _mlp())
    assert result.changed and op_counts(model)[op] == 2
    # 4-bit codes in blocks of 32: a few percent of the output scale on Gaussian weights.
    assert max_rel_error(_mlp(), model) < 0.2
    if form == "qdq":
        assert _initializer_types(model).count(TensorProto.INT4) == 2  # the codes: symmetric zero points are 0


def test_int4_qdq_needs_opset_21():
    with pytest.raises(PassError, match="need opset 21"):
        apply("quant:bits=4:measure=false:format=qdq", _mlp(opset=17))


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_int4_weights_shrink_the_model_to_under_a_fifth(form, tmp_path):
    from onnxforge.ir import save_model

    model, _ = apply(f"quant:bits=4:measure=false:format={form}", _mlp())
    before = W1.nbytes + W2.nbytes
    assert model.stats().bytes < 0.2 * before
    save_model(model, tmp_path / "int4.onnx")
    assert (tmp_path / "int4.onnx").stat().st_size < 0.2 * before + 2000  # the graph itself takes a little


def test_static_int8_qdq_quantizes_convs_and_onnxruntime_fuses_qlinearconv(tmp_path):
    data = _samples([1, 16, 12, 12], 8)
    model, result = apply("quant:mode=static:measure=false:format=qdq", _conv_net(), data=data)
    assert result.changed and result.stats["layers_quantized"] == 2
    counts = op_counts(model)
    # input, conv1's activated output (conv2's input) and conv2's activated output: three quantized tensors
    assert counts["QuantizeLinear"] == 3
    assert TensorProto.INT32 in _initializer_types(model)  # biases on the product of the input and weight scales
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 2
    assert result.stats["held_out_max_rel_error"] < 0.05


def test_static_needs_data():
    with pytest.raises(PassError, match="give sample inputs with --data"):
        apply("quant:mode=static:measure=false", _conv_net())


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_outliers_in_calibration_shrink_the_activation_scale_with_percentile_and_entropy(method):
    data = _samples([1, 16, 12, 12], 8)
    data[0]["x"][0, 0, 0, 0] = 500.0  # one huge outlier among 9,216 values
    minmax, _ = apply("quant:mode=static:measure=false", _conv_net(), data=data)
    spec = f"quant:mode=static:measure=false:calibration={method}:percentile=99.9"
    robust, _ = apply(spec, _conv_net(), data=data)
    assert _input_scale(robust) < _input_scale(minmax) / 10


def _input_scale(model: Model) -> float:
    quantize = next(node for node in model.graph.nodes if node.op == "QuantizeLinear" and node.inputs[0].name == "x")
    return float(quantize.inputs[1].values)


def test_a_shared_weight_is_quantized_once():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("MatMul", ["a2", "W"], ["b"]),
        helper.make_node("Relu", ["x"], ["a2"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    shared = make_model(
        nodes, [value_info("x", [4, 32])], [value_info("y", [4, 32])], [constant("W", W1[:32, :32])], 21
    )
    for spec in ("quant:measure=false", "quant:measure=false:format=qdq", "quant:bits=4:measure=false"):
        model, result = apply(spec, shared)
        assert result.stats["layers_quantized"] == 2
        integer = [t for t in _initializer_types(model) if t in (TensorProto.INT8, TensorProto.UINT8)]
        assert len(integer) <= 2, spec  # one set of codes (and zero points), not one per MatMul
        assert max_rel_error(shared, model) < 0.2


def test_an_already_quantized_model_is_left_alone():
    quantized, _ = apply("quant:measure=false", _mlp())
    again, result = apply("quant:measure=false", quantized)
    assert not result.changed and result.stats["already_quantized"]
    assert "quantized already" in result.notes[0]
    assert op_counts(again) == op_counts(quantized)


@pytest.mark.parametrize("exclude", ["fc2", "fc*2", "MatMul"])
def test_exclude_by_name_pattern_or_op_type(exclude):
    model, result = apply(f"quant:measure=false:exclude={exclude}", _mlp())
    expected = 0 if exclude == "MatMul" else 1
    assert result.stats["layers_quantized"] == expected
    assert any("excluded by exclude=" in note for note in result.notes)


def test_gemm_is_quantized_as_matmul_plus_bias():
    w = (RNG.standard_normal((16, 64)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0)]
    gemm = make_model(
        nodes,
        [value_info("x", [8, 64])],
        [value_info("y", [8, 16])],
        [constant("w", w), constant("b", np.ones(16, np.float32))],
        17,
    )
    model, result = apply("quant:measure=false", gemm)
    assert result.changed and op_counts(model)["Gemm"] == 0
    assert max_rel_error(gemm, model) < 0.03


def _embedding_model() -> onnx.ModelProto:
    table = RNG.standard_normal((100, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    return make_model(
        nodes,
        [value_info("ids", [2, 5], TensorProto.INT64)],
        [value_info("y", [2, 5, 8])],
        [constant("table", table), constant("w", RNG.standard_normal((64, 8)).astype(np.float32))],
        21,
    )


@pytest.mark.parametrize(
    "bits, lookup_ops, tolerance", [(8, {"Gather": 2}, 0.03), (4, {"GatherBlockQuantized": 1}, 0.2)]
)
def test_embedding_table_is_quantized_by_rows(bits, lookup_ops, tolerance):
    source = _embedding_model()
    model, result = apply(f"quant:bits={bits}:measure=false", source)
    assert result.stats["layers_quantized"] == 2
    counts = op_counts(model)
    assert all(counts[op] == count for op, count in lookup_ops.items())
    assert max_rel_error(source, model) < tolerance


def test_fused_attention_projection_is_split_out_and_quantized():
    from model_builders import BertLike
    import torch

    from onnxforge.frontends.torch import from_torch

    torch.manual_seed(0)
    net = BertLike(vocab=50, width=32, heads=4, layers=1, max_len=8)
    ids, mask = torch.randint(0, 50, (1, 8)), torch.ones(1, 8, dtype=torch.int64)
    exported = from_torch(net, (ids, mask), input_names=["input_ids", "attention_mask"])
    fused, _ = optimize(exported, "cleanup,fuse", verify=False)
    assert op_counts(fused)["Attention"] == 1
    model, result = apply("quant:measure=false", fused)
    counts = op_counts(model)
    assert counts["Attention"] == 0 and counts["MultiHeadAttention"] == 1
    assert result.stats["layers_quantized"] == result.stats["layers"]
    assert max_rel_error(fused, model) < 0.05


def test_error_budget_keeps_the_most_sensitive_layers_float():
    data = _samples([8, 64], 12)
    _, loose = apply("quant:bits=4:measure=false", _mlp(), data=data)
    budget = loose.stats["held_out_min_cosine"] + (1 - loose.stats["held_out_min_cosine"]) / 2
    _, result = apply(f"quant:bits=4:measure=false:min_cosine={budget}", _mlp(), data=data)
    assert result.stats["layers_float"] >= 1
    assert result.stats.get("held_out_min_cosine", 1.0) >= budget
    assert any("most sensitive" in note for note in result.notes)


def test_layers_are_ranked_on_at_most_sixteen_calibration_samples_and_the_budget_checked_on_every_held_out_one():
    data = _samples([8, 64], 48)  # 36 calibrate, 12 held out
    _, loose = apply("quant:bits=4:measure=false", _mlp(), data=data)
    budget = loose.stats["held_out_min_cosine"] + (1 - loose.stats["held_out_min_cosine"]) / 4
    _, result = apply(f"quant:bits=4:measure=false:min_cosine={budget}", _mlp(), data=data)
    ranked = [layer for layer in result.layers if layer.error is not None]
    assert ranked and all(layer.error_text.endswith(f"on {RANKING_SAMPLES} calibration samples") for layer in ranked)
    assert result.stats["held_out_min_cosine"] >= budget
    assert any(note.startswith("error on 12 held-out samples") for note in result.notes)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    mixing = RNG.standard_normal((64, 64)).astype(np.float32)
    data = [{"x": (RNG.standard_normal((8, 64)) @ mixing).astype(np.float32)} for _ in range(16)]
    _, rtn = apply("quant:bits=4:measure=false", _mlp(), data=data)
    _, gptq = apply("quant:bits=4:measure=false:weight_method=gptq", _mlp(), data=data)
    assert gptq.stats["held_out_max_rel_error"] < rtn.stats["held_out_max_rel_error"]


def test_measured_choice_explains_each_layer_type_and_never_keeps_a_slower_model():
    # The pass manager times the quantized model as a whole: quant declares it in its acceptance.
    model, report = optimize(_mlp(), "quant", seed=0)
    (record,) = report.passes
    assert any(note.startswith("MatMul layers (2) measured") for note in record.notes)
    if record.status == "applied":
        assert record.stats["measured_speedup"] >= 1.0
    else:
        assert op_counts(model) == op_counts(apply("cleanup", _mlp())[0])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("quant:bits=3", "choose 8 or 4"),
        ("quant:bits=4:mode=dynamic", "mode=weight-only"),
        ("quant:granularity=block:48:mode=weight-only", "power of two"),
        ("quant:granularity=rows", "choose per-channel, per-tensor or block:N"),
    ],
)
def test_impossible_options_are_refused_with_a_reason(spec, message):
    with pytest.raises(PassError, match=message):
        apply(spec, _mlp())


def test_optimize_takes_calibration_data_from_a_function():
    model, report = optimize(
        _conv_net(), "quant:mode=static:measure=false", data=lambda: iter(_samples([1, 16, 12, 12], 8))
    )
    assert report.passes[0].status == "applied"
    assert "Conv conv1: quantized: int8 static" in report.explanation()


def test_cli_quantizes_with_data_and_explains(tmp_path):
    from test_cli import OPTIMIZE, run_cli, succeeded

    from onnxforge.data import save_samples

    source, data, out = tmp_path / "net.onnx", tmp_path / "calibration.npz", tmp_path / "net.int8.onnx"
    onnx.save(_conv_net(), source)
    save_samples(data, _samples([1, 16, 12, 12], 8))
    passes = "quant:mode=static:measure=false"
    result = succeeded(run_cli(OPTIMIZE, source, "--passes", passes, "--data", data, "-o", out, "--explain"))
    assert "Conv conv2: quantized: int8 static" in result.stdout
    assert out.stat().st_size < 0.4 * source.stat().st_size


def test_cli_stops_with_one_line_when_static_quantization_has_no_data(tmp_path):
    from test_cli import OPTIMIZE, only_error_line, run_cli

    source, out = tmp_path / "net.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_net(), source)
    result = run_cli(OPTIMIZE, source, "--passes", "cleanup,quant:mode=static", "-o", out)
    assert result.returncode != 0 and "give sample inputs with --data" in only_error_line(result)
    assert not out.exists()


def test_lstm_weights_become_int8_for_onnxruntimes_dynamic_lstm():
    hidden, features = 16, 8
    w = (RNG.standard_normal((1, 4 * hidden, features)) * 0.3).astype(np.float32)
    r = (RNG.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    b = (RNG.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("LSTM", ["x", "w", "r", "b"], ["y", "y_h"], hidden_size=hidden)]
    source = make_model(
        nodes,
        [value_info("x", [5, 1, features])],
        [value_info("y", None), value_info("y_h", None)],
        [constant("w", w), constant("r", r), constant("b", b)],
        17,
    )
    model, result = apply("quant:measure=false", source)
    assert op_counts(model) == {"DynamicQuantizeLSTM": 1}
    assert _initializer_types(model).count(TensorProto.INT8) == 4  # W and R codes, and their zero points
    assert max_rel_error(source, model) < 0.03
    _, elsewhere = apply("quant:measure=false", source, backend="tvm")
    assert not elsewhere.changed and "DynamicQuantizeLSTM" in elsewhere.notes[0]


def _outlier_matmul() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """A MatMul whose two input channels are a hundred times larger than the rest, and 12 samples: one activation
    scale per tensor wastes nearly all int8 codes on them, blocks of 128 features confine them to one block."""
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((256, 64)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    source = make_model(nodes, [value_info("x", [16, 256])], [value_info("y", [16, 64])], [constant("w", weight)], 21)

    def sample():
        x = rng.standard_normal((16, 256)).astype(np.float32)
        x[:, :2] *= 100
        return {"x": x}

    return source, [sample() for _ in range(12)]


def test_error_budget_first_tries_finer_activation_blocks_before_float():
    source, data = _outlier_matmul()
    _, plain = apply("quant:measure=false", source, data=data)
    budget = plain.stats["held_out_min_cosine"] + (1 - plain.stats["held_out_min_cosine"]) / 2
    _, result = apply(f"quant:measure=false:min_cosine={budget}", source, data=data)
    assert result.stats["layers_quantized"] == 1 and result.stats["held_out_min_cosine"] >= budget
    assert any("given finer activation blocks" in note for note in result.notes)


def test_the_gentler_format_is_offered_only_when_it_runs_faster_than_float():
    source, data = _outlier_matmul()
    _, plain = apply("quant:measure=false", source, data=data)
    budget = plain.stats["held_out_min_cosine"] + (1 - plain.stats["held_out_min_cosine"]) / 2
    context = PassContext(data=data, timing=InterleavedTiming(blocks=3, block_s=0.01, min_runs=2, warmup=1))
    passes = create_passes(f"quant:min_speedup=0.5:min_cosine={budget}")
    _, records = PassManager(passes, context=context).run(load_model(source))
    notes = records[0].notes
    timed = [note for note in notes if note.startswith("gentler format for the error budget")]
    assert len(timed) == 1 and "timed" in timed[0]
    softened = any("given finer activation blocks" in note for note in notes)
    assert softened == timed[0].endswith("offered to the most sensitive layers")
    values = context.decisions.to_dict()["values"]
    assert values[next(key for key in values if key.endswith("gentler formats instead of float"))] == softened


def test_float_prefix_refinement_times_the_first_layers_in_float_and_explains_it():
    data = _samples([1, 16, 12, 12], 8)
    model, result = apply("quant:mode=static:float_prefix=true:min_speedup=0.5", _conv_net(), data=data)
    assert any(note.startswith("float prefixes timed against the plan (first 1: ") for note in result.notes)
    # A prefix reaching min_speedup is kept only if a second timing agrees, and the notes show that timing.
    assert any(note.startswith("timed again, a prefix kept only if both reach 0.5x: first 1: ") for note in result.notes)
    assert result.stats["layers_quantized"] + result.stats["layers_float"] == 2


def test_auto_mode_quantizes_convs_static_with_data_and_matmuls_dynamic():
    data = _samples([1, 16, 12, 12], 8)
    with_data, _ = apply("quant:measure=false", _conv_net(), data=data)
    assert op_counts(with_data)["QLinearConv"] == 2 and op_counts(with_data)["DynamicQuantizeLinear"] == 0
    without, _ = apply("quant:measure=false", _conv_net())
    assert op_counts(without)["QuantizeLinear"] == 0 and op_counts(without)["DynamicQuantizeLinear"] == 2
    mlp, _ = apply("quant:measure=false", _mlp(), data=_samples([8, 64], 4))
    assert op_counts(mlp)["DynamicQuantizeMatMul"] == 2
