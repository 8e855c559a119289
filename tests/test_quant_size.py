"""quant's static Conv written as the QLinearConv onnxruntime makes of its QDQ group: same kernels, same outputs,
a smaller file."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from graph_checks import apply, constant, make_model, op_counts, value_info
from onnx import helper

from onnxforge.ir import load_model, save_model
from onnxforge.passes.quantization.qlinear import conv_group, write_qlinear_conv
from onnxforge.passes.quantization.quant import Quantize, resolve_format

RNG = np.random.default_rng(7)
INPUT = [1, 8, 10, 10]


def _net() -> onnx.ModelProto:
    """conv1 -> Relu -> r1; r1 -> conv2 (stride 2) and conv3 (1x1, stride 2, no bias); y = c2 + c3, z = Sigmoid(r1)."""
    shapes = ([16, 8, 3, 3], [16, 16, 3, 3], [16, 16, 1, 1])
    w1, w2, w3 = (RNG.standard_normal(shape).astype(np.float32) * 0.2 for shape in shapes)
    b1, b2 = RNG.standard_normal(16).astype(np.float32) * 0.1, RNG.standard_normal(16).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=1),
        helper.make_node("Conv", ["r1", "w3"], ["c3"], strides=[2, 2], pads=[0, 0, 0, 0]),
        helper.make_node("Add", ["c2", "c3"], ["y"]),
        helper.make_node("Sigmoid", ["r1"], ["z"]),
    ]
    weights = [constant("w1", w1), constant("b1", b1), constant("w2", w2), constant("b2", b2), constant("w3", w3)]
    return make_model(nodes, [value_info("x", INPUT)], [value_info("y", None), value_info("z", None)], weights, 17)


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(INPUT).astype(np.float32)} for _ in range(count)]


def _executed(source: onnx.ModelProto | str, tmp_path, name: str) -> list[tuple[str, str]]:
    """The nodes onnxruntime runs (all graph optimizations on, as by default): domain and op type, in order."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}.executed.onnx")
    loaded = source.SerializeToString() if isinstance(source, onnx.ModelProto) else source
    ort.InferenceSession(loaded, options, providers=["CPUExecutionProvider"])
    return [(node.domain, node.op_type) for node in onnx.load(options.optimized_model_filepath).graph.node]


def _outputs(source: onnx.ModelProto | str, samples: list[dict]) -> list[np.ndarray]:
    loaded = source.SerializeToString() if isinstance(source, onnx.ModelProto) else source
    session = ort.InferenceSession(loaded, providers=["CPUExecutionProvider"])
    return [output for sample in samples for output in session.run(None, sample)]


def test_static_conv_in_qlinearconv_form_runs_the_kernels_and_outputs_of_its_qdq_form(tmp_path):
    net, data = _net(), _samples(8, seed=1)
    qdq, _ = apply("quant:mode=static:measure=false:format=qdq", net, data=data)
    qlinear, result = apply("quant:mode=static:measure=false:format=qoperator", net, data=data)
    assert result.stats["layers_quantized"] == 3
    # The input is quantized once; r1's codes go from conv1 straight to conv2 and conv3; c2, c3 and r1 are
    # dequantized for Add and Sigmoid. No weight or bias DequantizeLinear, and the Relu is the quantization's.
    assert op_counts(qlinear) == {"QuantizeLinear": 1, "QLinearConv": 3, "DequantizeLinear": 3, "Add": 1, "Sigmoid": 1}
    paths = {form: save_model(model, tmp_path / f"{form}.onnx") for form, model in (("qdq", qdq), ("qlinear", qlinear))}
    executed = {form: _executed(str(path), tmp_path, form) for form, path in paths.items()}
    assert executed["qlinear"] == executed["qdq"]
    assert sum(op.endswith("QLinearConv") for _, op in executed["qdq"]) == 3
    # The same kernels on the same constants: equal bit for bit, on inputs calibration never saw.
    fresh = _samples(4, seed=99)
    for qdq_output, qlinear_output in zip(_outputs(str(paths["qdq"]), fresh), _outputs(str(paths["qlinear"]), fresh)):
        np.testing.assert_array_equal(qlinear_output, qdq_output)
    # Smaller by more than the two biases' scale vectors (16 floats each), which QLinearConv needs no more.
    assert paths["qlinear"].stat().st_size < paths["qdq"].stat().st_size - 2 * 16 * 4


def test_float_consumers_read_the_dequantized_value_under_the_float_tensors_name():
    qlinear, _ = apply("quant:mode=static:measure=false:format=qoperator", _net(), data=_samples(8, seed=1))
    tensors = qlinear.graph.tensors()
    for name in ("r1", "c2", "c3"):
        assert [node.op for node in tensors[name].inputs] == ["DequantizeLinear"]
        assert [node.op for node in tensors[f"{name}_q"].inputs] == ["QLinearConv"]


def test_qlinearconv_leaves_out_attributes_at_their_defaults():
    qlinear, _ = apply("quant:mode=static:measure=false:format=qoperator", _net(), data=_samples(8, seed=1))
    convs = {node.outputs[0].name: node.attrs for node in qlinear.graph.nodes if node.op == "QLinearConv"}
    assert convs["r1_q"] == {"pads": [1, 1, 1, 1]}
    assert convs["c2_q"] == {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    assert convs["c3_q"] == {"strides": [2, 2]}


def test_format_auto_writes_qlinearconv_for_onnxruntime_and_qdq_for_other_backends():
    options = Quantize.Options(mode="static")
    assert resolve_format(options, 17, contrib_ops=True).form == "qoperator"
    assert resolve_format(options, 17, contrib_ops=False).form == "qdq"
    auto, result = apply("quant:mode=static:measure=false", _net(), data=_samples(8, seed=1))
    assert op_counts(auto)["QLinearConv"] == 3
    assert any("per-channel symmetric weights, QLinearConv" in note for note in result.notes)


def test_static_matmul_stays_qdq_in_the_qoperator_form():
    weight = RNG.standard_normal((32, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    mlp = make_model(nodes, [value_info("x", [4, 32])], [value_info("y", [4, 16])], [constant("w", weight)], 17)
    data = [{"x": RNG.standard_normal((4, 32)).astype(np.float32)} for _ in range(8)]
    model, result = apply("quant:mode=static:measure=false:format=qoperator", mlp, data=data)
    assert op_counts(model) == {"QuantizeLinear": 1, "DequantizeLinear": 2, "MatMul": 1}
    assert "MatMul fc: quantized: int8 static, per-channel symmetric weights, QDQ" in result.notes


def _qdq_conv(activation: str = "", zero_point: int = 0, also_read_by: str = "") -> onnx.ModelProto:
    """A QDQ Conv as quant writes it: x -> Q -> DQ -> Conv(DQ(w), DQ(b)) [-> activation] -> Q -> DQ -> y.

    also_read_by: "output" makes the Conv's output a graph output too, "Sigmoid" gives it a second consumer.
    """
    x_scale, y_scale = np.float32(0.02), np.float32(0.05)
    w_scale = (RNG.uniform(0.5, 1.5, 8) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["c"], pads=[1, 1, 1, 1]),
    ]
    quantized = "c"
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["a"]))
        quantized = "a"
    elif activation == "Clip":
        nodes.append(helper.make_node("Clip", ["c", "low", "high"], ["a"]))
        quantized = "a"
    nodes += [
        helper.make_node("QuantizeLinear", [quantized, "y_scale", "y_zp"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"]),
    ]
    outputs = [value_info("y", None)]
    if also_read_by == "output":
        outputs.append(value_info("c", None))
    elif also_read_by == "Sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["c"], ["s"]))
        outputs.append(value_info("s", None))
    constants = [
        constant("x_scale", x_scale),
        constant("x_zp", np.uint8(128)),
        constant("w_q", RNG.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)),
        constant("w_scale", w_scale),
        constant("b_q", RNG.integers(-500, 500, 8).astype(np.int32)),
        constant("b_scale", (x_scale * w_scale).astype(np.float32)),
        constant("y_scale", y_scale),
        constant("y_zp", np.uint8(zero_point)),
    ]
    if activation == "Clip":
        constants += [constant("low", np.float32(0)), constant("high", np.float32(6))]
    return make_model(nodes, [value_info("x", [1, 4, 6, 6])], outputs, constants, 17)


@pytest.mark.parametrize(
    "variant, fused",
    [
        (dict(), True),
        (dict(activation="Relu", zero_point=0), True),  # the quantization clamps at 0 anyway: the Relu goes
        (dict(activation="Relu", zero_point=3), False),  # the Relu clamps above the codes' minimum
        (dict(also_read_by="output"), False),
        (dict(also_read_by="Sigmoid"), False),
    ],
    ids=["plain", "relu-at-the-zero-point", "relu-above-the-zero-point", "conv-output-a-graph-output", "read-twice"],
)
def test_a_qdq_conv_group_is_fused_exactly_where_onnxruntime_fuses_it(variant, fused, tmp_path):
    source = _qdq_conv(**variant)
    assert any(op == "QLinearConv" for _, op in _executed(source, tmp_path, "qdq")) == fused  # onnxruntime's decision
    model = load_model(source)
    conv = next(node for node in model.graph.nodes if node.op == "Conv")
    group = conv_group(model.graph, conv)
    assert (group is not None) == fused
    if not fused:
        return
    write_qlinear_conv(group, gs.Constant("int8_zero", np.zeros((), np.int8)))
    model.graph.cleanup().toposort()
    assert op_counts(model) == {"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1}
    written = model.to_proto()
    assert _executed(written, tmp_path, "qlinear") == _executed(source, tmp_path, "qdq")
    samples = [{"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(3)]
    for expected, actual in zip(_outputs(source, samples), _outputs(written, samples)):
        np.testing.assert_array_equal(actual, expected)


def test_a_conv_group_behind_a_clip_is_left_to_onnxruntime():
    model = load_model(_qdq_conv(activation="Clip"))
    conv = next(node for node in model.graph.nodes if node.op == "Conv")
    assert conv_group(model.graph, conv) is None


def test_static_per_channel_asked_for_on_an_opset_without_per_channel_dequantize_is_refused_with_a_way_out():
    from onnxforge.errors import PassError

    old = make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [1])], [value_info("y", [1])], [], 12)
    with pytest.raises(PassError, match=r"need opset 13.*upgrade-opset:to=13") as raised:
        apply("quant:mode=static:measure=false:granularity=per-channel", old, data=[{"x": np.ones(1, np.float32)}])
    assert "format=qoperator" not in str(raised.value)
