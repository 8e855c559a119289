"""The fp16 and bf16 passes: regions, borders, weights, options, and numerics in onnxruntime.

Tolerances. float16 keeps 11 significant bits (unit roundoff 2**-11 = 4.9e-4), bfloat16 8 (2**-8 = 3.9e-3).
onnxruntime's CPU provider has float16 kernels for data movement only and computes everything else in float32
after casting (its InsertCastTransformer), so in onnxruntime an fp16 model differs from the float32 one by the
rounding of its weights and of the values crossing a region border: a few unit roundoffs relative to the
output's scale. We allow 1e-2 for the small graphs (20x the unit roundoff) and 5e-3 for the exported
PyTorch CNN and transformer, whose measured error is at most 4.2e-4. True half arithmetic is checked with
onnx's reference evaluator, which computes float16 and bfloat16 ops in those types; bfloat16 gets 3e-2
(8x its unit roundoff).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import onnxforge
from graph_checks import apply, constant, make_model, max_rel_error, op_counts, value_info
from model_builders import torch_cases
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import Model
from onnxforge.ir.validity import check_model
from test_cli import OPTIMIZE, run_cli, succeeded



def _normal(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _mlp_softmax(width: int = 8, classes: int = 4) -> onnx.ModelProto:
    """y = Softmax(Relu(x @ W + b)): three ops to convert and one to keep, so two region borders."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Softmax", ["r"], ["y"], axis=-1),
        ],
        [value_info("x", [2, width])],
        [value_info("y", [2, classes])],
        [
            constant("W", _normal(width, classes)),
            constant("b", np.ones(classes, np.float32)),
        ],
    )


def _proto(model: Model) -> onnx.ModelProto:
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)  # full_check runs strict shape and type inference too
    return proto


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value and weight of the main graph, by name."""
    graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _run(model: Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = model.to_proto() if isinstance(model, Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / np.max(np.abs(expected)))


def _casts_reading(proto: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == "Cast" and n.input[0] == name]


# --- fp16 on small graphs -------------------------------------------------------------------------------


def test_fp16_converts_matmul_add_relu_and_keeps_softmax_float32_with_casts_at_the_two_borders():
    source = _mlp_softmax()

    model, result = apply("fp16", source)

    proto = _proto(model)
    types = _elem_types(proto)
    assert op_counts(model) == {"MatMul": 1, "Add": 1, "Relu": 1, "Softmax": 1, "Cast": 2}
    assert types["W"] == types["b"] == TensorProto.FLOAT16
    assert types["x"] == types["y"] == TensorProto.FLOAT  # keep_io_types: callers feed the same arrays
    assert types["r"] == TensorProto.FLOAT16
    [softmax] = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert types[softmax.input[0]] == TensorProto.FLOAT
    assert result.changed
    assert result.stats["nodes_converted"] == 3
    assert result.stats["nodes_kept_float32"] == 1
    assert result.stats["casts_inserted"] == 2
    assert result.stats["weights_converted"] == 2
    assert (result.stats["weight_bytes_before"], result.stats["weight_bytes_after"]) == (144, 72)
    assert any("Softmax" in note for note in result.notes)
    assert max_rel_error(source, model) < 1e-2


def test_fp16_without_keep_io_types_makes_inputs_and_outputs_float16():
    source = _mlp_softmax()

    model, result = apply("fp16:keep_io_types=false", source)

    proto = _proto(model)
    types = _elem_types(proto)
    assert types["x"] == types["y"] == TensorProto.FLOAT16
    assert op_counts(model)["Cast"] == 2  # into the float32 Softmax, and its result back to the float16 output
    x = _normal(2, 8)
    [expected] = _run(source, {"x": x})
    [actual] = _run(model, {"x": x.astype(np.float16)})
    assert actual.dtype == np.float16
    assert _rel_error(actual, expected) < 1e-2


def test_value_read_by_kept_and_half_ops_gets_one_cast_per_direction():
    # h feeds a kept Softmax, a kept Exp and a half Relu; x (float32 input) feeds two half MatMuls.
    source = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("MatMul", ["x", "V"], ["g"]),
            helper.make_node("Softmax", ["h"], ["s"], axis=-1),
            helper.make_node("Exp", ["h"], ["e"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Add", ["r", "g"], ["y"]),
        ],
        [value_info("x", [2, 8])],
        [value_info("s", [2, 4]), value_info("e", [2, 4]), value_info("y", [2, 4])],
        [constant("W", _normal(8, 4)), constant("V", np.eye(8, 4, dtype=np.float32))],
    )

    model, result = apply("fp16", source)

    proto = _proto(model)
    assert len(_casts_reading(proto, "x")) == 1
    assert len(_casts_reading(proto, "h")) == 1
    # The borders: x into the MatMuls, h into Softmax and Exp, and the float16 y back to a float32 output.
    assert op_counts(model)["Cast"] == result.stats["casts_inserted"] == 3
    assert max_rel_error(source, model) < 1e-2


def test_weight_read_by_kept_and_half_ops_keeps_its_float32_values_for_the_kept_op():
    source = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "c"], ["a"]),
            helper.make_node("Pow", ["x4", "c"], ["p"]),
            helper.make_node("Add", ["a", "p"], ["y"]),
        ],
        [value_info("x", [2, 8]), value_info("x4", [2, 4])],
        [value_info("y", [2, 4])],
        [constant("W", _normal(8, 4)), constant("c", np.full(4, 2.0, np.float32))],
    )

    model, result = apply("fp16", source)

    proto = _proto(model)
    types = _elem_types(proto)
    [power] = [n for n in proto.graph.node if n.op_type == "Pow"]
    assert types[power.input[1]] == TensorProto.FLOAT
    assert TensorProto.FLOAT16 in {types[name] for name in types if name.startswith("c")}
    assert result.stats["weights_left_float32"] == 1


def test_fp16_clamps_weights_beyond_its_range_and_counts_them_and_the_flushed_ones():
    weights = np.array([[1e5, -7e4, 1.0, 1e-9], [np.inf, 0.5, -2.0, 0.0]], dtype=np.float32).T
    source = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [value_info("x", [2, 4])],
        [value_info("y", [2, 2])],
        [constant("W", weights)],
    )

    model, result = apply("fp16", source)

    [converted] = [t for t in model.graph.nodes[1].inputs if t.name == "W"]
    values = converted.values
    assert values.dtype == np.float16
    assert values[0, 0] == 65504 and values[1, 0] == -65504
    assert np.isposinf(values[0, 1])  # infinities are not clamped: they stay what they were
    assert values[3, 0] == 0
    assert result.stats["values_clamped"] == 2
    assert result.stats["values_flushed_to_zero"] == 1


def test_keep_option_adds_op_types_and_node_names_and_convert_takes_ops_out_of_the_default_set():
    source = _mlp_softmax()
    source.graph.node[1].name = "bias_add"

    kept, kept_result = apply("fp16:keep=Relu+bias_add", source)
    converted, _ = apply("fp16:convert=Softmax", source)

    kept_types = _elem_types(_proto(kept))
    assert kept_types["a"] == kept_types["r"] == TensorProto.FLOAT
    assert kept_result.stats["nodes_kept_float32"] == 3
    converted_proto = _proto(converted)
    [softmax] = [n for n in converted_proto.graph.node if n.op_type == "Softmax"]
    assert _elem_types(converted_proto)[softmax.input[0]] == TensorProto.FLOAT16
    assert max_rel_error(source, converted) < 1e-2


def test_exp_kept_in_float32_does_not_overflow_where_float16_arithmetic_would():
    # Logits near 12: exp(12) = 1.6e5 is beyond float16's 65504. The reference evaluator computes in the
    # declared types, so it shows what a runtime with real float16 kernels would produce.
    source = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Exp", ["h"], ["y"])],
        [value_info("x", [1, 2])],
        [value_info("y", [1, 2])],
        [constant("W", np.full((2, 2), 6.0, np.float32))],
    )
    x = np.ones((1, 2), np.float32)

    kept, _ = apply("fp16", source)
    converted, _ = apply("fp16:convert=Exp", source)

    [expected] = ReferenceEvaluator(source).run(None, {"x": x})
    [with_kept_exp] = ReferenceEvaluator(_proto(kept)).run(None, {"x": x})
    with np.errstate(over="ignore"):
        [with_half_exp] = ReferenceEvaluator(_proto(converted)).run(None, {"x": x})
    assert _rel_error(with_kept_exp, expected) < 1e-2
    assert np.isinf(with_half_exp).all()


def test_resize_scales_stay_float32_and_its_data_converts():
    source = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="linear"),
        ],
        [value_info("x", [1, 2, 4, 4])],
        [value_info("y", [1, 3, 8, 8])],
        [
            constant("W", _normal(3, 2, 3, 3)),
            constant("scales", np.array([1, 1, 2, 2], np.float32)),
        ],
    )

    model, _ = apply("fp16", source)

    types = _elem_types(_proto(model))
    assert types["scales"] == TensorProto.FLOAT
    assert types["c"] == types["W"] == TensorProto.FLOAT16
    assert max_rel_error(source, model) < 1e-2


def test_casts_to_float_constants_and_constant_of_shape_in_a_half_region_become_half():
    source = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Cast", ["ids"], ["ids_float"], to=TensorProto.FLOAT),
            helper.make_node("Constant", [], ["k"], value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.5])),
            helper.make_node("Shape", ["h"], ["shape"]),
            helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=helper.make_tensor("", 1, [1], [1.0])),
            helper.make_node("Mul", ["ids_float", "k"], ["scaled"]),
            helper.make_node("Add", ["h", "scaled"], ["a"]),
            helper.make_node("Add", ["a", "ones"], ["y"]),
        ],
        [value_info("x", [2, 8]), value_info("ids", [2, 4], TensorProto.INT64)],
        [value_info("y", [2, 4])],
        [constant("W", _normal(8, 4))],
    )

    model, result = apply("fp16", source)

    types = _elem_types(_proto(model))
    assert types["ids_float"] == types["k"] == types["ones"] == types["scaled"] == TensorProto.FLOAT16
    assert op_counts(model)["Cast"] == 1 + 2  # the model's own Cast, x into MatMul, y back to float32
    assert result.stats["weights_converted"] == 3  # W and the values of Constant and ConstantOfShape
    feeds = {"x": _normal(2, 8), "ids": np.arange(8).reshape(2, 4)}
    [expected], [actual] = _run(source, feeds), _run(model, feeds)
    assert _rel_error(actual, expected) < 1e-2


def test_onnxruntime_contrib_ops_convert_through_onnxruntime_schemas():
    source = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Gelu", ["h"], ["y"], domain="com.microsoft")],
        [value_info("x", [2, 8])],
        [value_info("y", [2, 4])],
        [constant("W", _normal(8, 4))],
    )
    source.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    model, result = apply("fp16", source)

    assert result.stats["nodes_converted"] == 2
    assert op_counts(model)["Cast"] == 2  # only at the graph's input and output
    assert max_rel_error(source, model) < 1e-2


def test_model_without_float32_tensors_is_left_unchanged():
    source = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [value_info("x", [2, 8], TensorProto.FLOAT16)],
        [value_info("y", [2, 4], TensorProto.FLOAT16)],
        [constant("W", np.ones((8, 4), np.float16))],
    )

    model, result = apply("fp16", source)

    assert not result.changed
    assert result.stats == {"float32_tensors": 0}
    assert op_counts(model) == {"MatMul": 1}


# --- exported PyTorch models ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_exported_pytorch_models_convert_run_and_stay_close_to_float32(name):
    case = torch_cases()[name]
    source = from_torch(case.module, case.example_inputs, case.input_names, case.output_names)

    model, result = apply("fp16", source)

    check_model(model)
    assert result.stats["weight_bytes_after"] * 2 == result.stats["weight_bytes_before"]
    assert result.stats["weights_left_float32"] <= 2  # LayerNorm scales behind an Identity stay exact
    if name == "transformer":
        assert op_counts(model)["Cast"] - op_counts(source)["Cast"] == result.stats["casts_inserted"]
        assert "LayerNormalization" in " ".join(result.notes) and "Softmax" in " ".join(result.notes)
    assert max_rel_error(source, model) < 5e-3


def test_loop_body_converts_inside_with_casts_at_its_borders_and_reads_outer_half_values_directly():
    # v = x @ W; three times: v = tanh(v @ U + v0), where v0 = x @ W is read from the outer graph.
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["v", "U"], ["vu"]),
            helper.make_node("Add", ["vu", "v0"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["v_next"]),
            helper.make_node("Identity", ["cond"], ["cond_next"]),
        ],
        "body",
        [value_info("i", [], TensorProto.INT64), value_info("cond", [], TensorProto.BOOL), value_info("v", [2, 4])],
        [value_info("cond_next", [], TensorProto.BOOL), value_info("v_next", [2, 4])],
    )
    source = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["v0"]),
            helper.make_node("Loop", ["trips", "", "v0"], ["y"], body=body),
        ],
        [value_info("x", [2, 8])],
        [value_info("y", [2, 4])],
        [
            constant("W", _normal(8, 4)),
            constant("U", _normal(4, 4) / 2),
            constant("trips", np.array(3, np.int64)),
        ],
    )

    model, result = apply("fp16", source)

    check_model(model)
    _, body_graph = model.graphs()
    body_casts = [n for n in body_graph.nodes if n.op == "Cast"]
    assert len(body_casts) == 2  # the carried value into the MatMul, and the result back to float32
    [add] = [n for n in body_graph.nodes if n.op == "Add"]
    assert any(t.name == "v0" and t.dtype == np.float16 for t in add.inputs)  # outer half value, no cast
    assert [n.op for n in model.graph.nodes].count("Cast") == 2  # x into MatMul, v0 into the Loop
    assert result.stats["casts_inserted"] == 4
    assert any("Loop" in note for note in result.notes)
    assert max_rel_error(source, model) < 1e-2


# --- through the pass manager and the command line -----------------------------------------------------


def test_optimize_applies_fp16_and_the_cli_saves_a_model_half_the_size(tmp_path):
    source = _mlp_softmax(width=256, classes=256)
    model, report = onnxforge.optimize(source, "fp16", seed=0)
    [record] = report.passes
    assert record.status == "applied", record.error
    assert record.max_rel_error < 1e-2

    path, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(source, str(path))
    # The budget without the default's labels (the argmax of 256 random-weight logits may have near ties that fp16
    # rounding flips); the report says why if the pass is not kept (it stayed float once in CI, cause not found).
    report = tmp_path / "report.json"
    succeeded(run_cli(OPTIMIZE, path, "--passes", "fp16", "--budget", "cosine=0.99", "-o", out, "--report", report))
    [record] = json.loads(report.read_text())["passes"]
    assert record["status"] == "applied", (record["error"], record["budget"], record["notes"])

    assert 0.45 < out.stat().st_size / path.stat().st_size < 0.55
    saved = onnx.load(str(out))
    assert {t.data_type for t in saved.graph.initializer} == {TensorProto.FLOAT16}
    x = _normal(2, 256)
    assert _rel_error(_run(saved, {"x": x})[0], _run(source, {"x": x})[0]) < 1e-2


def test_optimize_verifies_fp16_inputs_and_outputs_on_the_same_values_cast_to_float16():
    _, report = onnxforge.optimize(_mlp_softmax(width=64, classes=16), "fp16:keep_io_types=false", seed=0)
    [record] = report.passes
    assert record.status == "applied", record.error
    assert record.max_rel_error < 1e-2


# --- bf16 -------------------------------------------------------------------------------------------------


def test_bf16_gives_a_valid_model_with_bfloat16_weights_and_reference_numerics():
    source = _mlp_softmax()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in source.graph.initializer}

    model, result = apply("bf16", source)

    proto = _proto(model)
    assert op_counts(model)["Cast"] == 2
    converted = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name, values in weights.items():
        assert converted[name].dtype == helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
        np.testing.assert_allclose(converted[name].astype(np.float32), values, rtol=2**-8)
    assert result.stats["weight_bytes_after"] * 2 == result.stats["weight_bytes_before"]
    # onnxruntime's CPU provider has no bfloat16 kernels for MatMul, Add or Relu: the reference evaluator
    # computes them in bfloat16 instead.
    x = _normal(2, 8)
    [expected] = ReferenceEvaluator(source).run(None, {"x": x})
    [actual] = ReferenceEvaluator(proto).run(None, {"x": x})
    assert actual.dtype == np.float32
    assert _rel_error(actual, expected) < 3e-2


@pytest.mark.parametrize(("opset", "converts"), [(17, False), (22, True)])
def test_bf16_converts_conv_only_from_the_opset_whose_schema_admits_bfloat16(opset, converts):
    source = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"])],
        [value_info("x", [1, 2, 4, 4])],
        [value_info("y", [1, 3, 2, 2])],
        [constant("W", _normal(3, 2, 3, 3))],
        opset=opset,
    )

    model, result = apply("bf16", source)

    _proto(model)
    assert result.changed == converts
    assert (op_counts(model)["Cast"] == 2) == converts
    if not converts:
        assert "schema has no bfloat16 type" in result.notes[0]
