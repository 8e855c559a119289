"""Old opsets and odd models, built the way the real ones that showed each failure were: fp16 constants widened to
float32, models quantized by onnxruntime's own tools, exports at opset 11 and 12, shared weights, If branches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnxforge
from onnxforge.ir import Model, load_model
from onnxforge.ir.patterns import RewriteRule
from onnxforge.pipeline import PassContext, create_passes
from onnxforge.pipeline.base import CompositePass, Pass, PassResult
from onnxforge.passes.fusion.base import RuleBasedPass
from onnxforge.pipeline.manager import PassManager
from onnxforge.pipeline.verifier import VerifyOptions


def _ops(model: Model | onnx.ModelProto) -> list[str]:
    graph = model.graph if isinstance(model, onnx.ModelProto) else model.to_proto().graph
    return [node.op_type for node in graph.node]


def _gelu_silu_model(divisor: float) -> onnx.ModelProto:
    """x -> erf-GELU with `divisor` in place of sqrt(2) -> SiLU: what an fp16 model widened to float32 holds."""
    nodes = [
        helper.make_node("Div", ["x", "d"], ["a"]),
        helper.make_node("Erf", ["a"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["x", "p"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Mul", ["g", "s"], ["y"]),
    ]
    constants = [
        numpy_helper.from_array(np.array(divisor, np.float32), "d"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu_silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# --- 5a: a rule matches only the constants it computes exactly -------------------------------------------


def test_erf_gelu_is_not_fused_with_sqrt2_rounded_to_fp16():
    model = load_model(_gelu_silu_model(float(np.float16(math.sqrt(2)))))  # 1.4140625
    (fuse,) = create_passes("fuse-activations")
    fuse.run(model, PassContext())
    assert "Erf" in _ops(model) and "Gelu" not in _ops(model)


def test_erf_gelu_is_fused_with_sqrt2_as_float32_holds_it():
    model = load_model(_gelu_silu_model(float(np.float32(math.sqrt(2)))))
    (fuse,) = create_passes("fuse-activations")
    fuse.run(model, PassContext())
    assert "Erf" not in _ops(model) and "Gelu" in _ops(model)


def test_fuse_on_an_fp16_widened_gelu_keeps_the_exact_silu_fusion():
    optimized, report = onnxforge.optimize(_gelu_silu_model(1.4140625), "fuse", seed=0)
    (record,) = report.passes
    assert record.status == "applied"
    assert "Erf" in _ops(optimized) and "QuickGelu" in _ops(optimized)


# --- 5b: composite passes verified member by member ------------------------------------------------------


def _relu(op, x):
    return op.Relu(x)


def _tanh(op, x):
    return op.Tanh(x)


def _double_neg(op, x):
    return op.Neg(op.Neg(x))


def _identity(op, x):
    return op.Identity(x)


class BreaksAndFixes(RuleBasedPass):
    """One rule that changes the outputs (Relu -> Tanh) and one exact one (Neg(Neg(x)) -> x)."""

    name = "test-breaks-and-fixes"
    rules = (RewriteRule("relu-to-tanh", _relu, _tanh), RewriteRule("double-neg", _double_neg, _identity))


class ChangesOutputs(Pass):
    name = "test-changes-outputs"

    def run(self, model, ctx):
        for node in model.graph.nodes:
            if node.op == "Relu":
                node.op = "Sigmoid"
        return PassResult(changed=True)


class CountsNodes(Pass):
    name = "test-counts-nodes"

    def run(self, model, ctx):
        return PassResult(changed=False, stats={"seen": len(model.graph.nodes)}, notes=["counted"])


@dataclass
class _Rounds:
    max_rounds: int = 2


class Together(CompositePass):
    name = "test-together"
    Options = _Rounds

    def __init__(self, members: list[Pass]):
        super().__init__()
        self._members = members

    def members(self) -> list[Pass]:
        return list(self._members)


def _relu_neg_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Neg", ["r"], ["n1"]),
        helper.make_node("Neg", ["n1"], ["n2"]),
        helper.make_node("Add", ["n2", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "relu_neg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_failing_member_of_a_composite_pass_does_not_cost_the_others():
    model = load_model(_relu_neg_model())
    together = Together([ChangesOutputs(), create_passes("remove-identity")[0], CountsNodes()])
    rules = Together([BreaksAndFixes()])
    result, (first, second) = PassManager([rules, together], VerifyOptions(seed=0)).run(model)
    # The rule pass failed as a whole, then each rule was checked alone: only the exact one stays.
    assert second.status == "applied" and first.status == "applied"
    assert {m["name"]: m["status"] for m in first.members} == {
        "test-breaks-and-fixes": "rolled_back",
        "test-breaks-and-fixes/double-neg": "applied",
        "test-breaks-and-fixes/relu-to-tanh": "rolled_back",
    }
    assert {m["name"]: m["status"] for m in second.members} == {
        "test-changes-outputs": "rolled_back",
        "remove-identity": "applied",
    }
    assert any("test-changes-outputs rolled back: outputs changed" in note for note in second.notes)
    assert "counted" in second.notes and second.stats["seen"] > 0
    assert _ops(result) == ["Relu", "Add"]


def test_a_composite_pass_whose_only_change_fails_is_rolled_back_with_the_reason():
    model = load_model(_relu_neg_model())
    result, (record,) = PassManager([Together([ChangesOutputs()])], VerifyOptions(seed=0)).run(model)
    assert record.status == "rolled_back"
    assert record.error.startswith("test-changes-outputs: outputs changed")
    assert _ops(result) == ["Relu", "Neg", "Neg", "Add"]


def test_a_composite_pass_run_directly_runs_its_members_unverified():
    model = load_model(_relu_neg_model())
    result = Together([ChangesOutputs(), CountsNodes()]).run(model, PassContext())
    assert result.changed and result.notes == ["counted", "counted"]
    assert "Sigmoid" in _ops(model)


# --- 3: cleanup on models that are int8 already ------------------------------------------------------------


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y + self.conv2(y)
        return self.head(y.mean(dim=(2, 3)))


def _export(module: nn.Module, example: torch.Tensor, path, opset: int, dynamic: bool = False) -> None:
    torch.manual_seed(0)
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None
    torch.onnx.export(
        module.eval(), (example,), str(path), opset_version=opset, dynamo=False,
        input_names=["x"], output_names=["y"], dynamic_axes=axes,
    )


def _ort_quantized(tmp_path, kind: str, opset: int = 13) -> str:
    """The small CNN quantized by onnxruntime's own tool (dynamic, static QDQ or static QOperator)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    torch.manual_seed(0)
    float_path, out = tmp_path / "float.onnx", tmp_path / f"{kind}.onnx"
    _export(_SmallCNN(), torch.randn(1, 3, 8, 8), float_path, opset)

    class Samples(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.samples = iter([{"x": rng.standard_normal((1, 3, 8, 8), np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.samples, None)

    if kind == "dynamic":
        quantize_dynamic(str(float_path), str(out))
    else:
        fmt = QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator
        quantize_static(str(float_path), str(out), Samples(), quant_format=fmt)
    return str(out)


def _without_output_shapes(path: str) -> onnx.ModelProto:
    """The model with its outputs declared without a shape, as converters write them (onnxruntime takes it)."""
    proto = onnx.load(path)
    for output in proto.graph.output:
        output.type.tensor_type.ClearField("shape")
    return proto


@pytest.mark.parametrize("kind", ["dynamic", "qdq", "qoperator"])
def test_cleanup_gives_a_valid_model_on_an_int8_model_from_onnxruntime_tools(tmp_path, kind):
    proto = _without_output_shapes(_ort_quantized(tmp_path, kind))
    optimized, report = onnxforge.optimize(proto, "cleanup", seed=0)
    (record,) = report.passes
    assert record.status == "applied", record.error
    session = ort.InferenceSession(optimized.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0].shape == (1, 10)


# --- 1: quant on opset 11 and 12 --------------------------------------------------------------------------


class _LinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 32)
        self.second = nn.Linear(32, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _assert_runs_without_per_axis_dequantize(model: Model, feed: dict[str, np.ndarray]) -> None:
    proto = model.to_proto()
    onnx.checker.check_model(proto)
    for node in proto.graph.node:
        assert not (node.op_type == "DequantizeLinear" and any(a.name == "axis" for a in node.attribute))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, feed)


@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quant_moves_an_opset_11_or_12_cnn_to_13_for_per_channel_weights(tmp_path, opset, mode):
    torch.manual_seed(0)
    _export(_SmallCNN(), torch.randn(1, 3, 8, 8), tmp_path / "cnn.onnx", opset)
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((1, 3, 8, 8), np.float32)} for _ in range(4)]
    passes = f"quant:measure=false:mode={mode}:format=qdq"
    optimized, report = onnxforge.optimize(tmp_path / "cnn.onnx", passes, data=data, seed=0)
    (record,) = report.passes
    assert record.status == "applied", record.error
    assert record.stats["layers_quantized"] == 3
    assert record.notes[0].startswith(f"moved from opset {opset} to 13")
    proto = optimized.to_proto()
    onnx.checker.check_model(proto)
    assert optimized.graph.opset == 13
    assert any(n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute) for n in proto.graph.node)
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data[0])


@pytest.mark.parametrize("opset", [11, 12])
def test_quant_writes_what_opset_11_and_12_allow_on_a_linear_model(tmp_path, opset):
    torch.manual_seed(0)
    _export(_LinearNet(), torch.randn(2, 16), tmp_path / "mlp.onnx", opset, dynamic=True)
    optimized, report = onnxforge.optimize(tmp_path / "mlp.onnx", "quant:measure=false", seed=0)
    assert report.passes[0].status == "applied", report.passes[0].error
    assert "DynamicQuantizeMatMul" in _ops(optimized)
    _assert_runs_without_per_axis_dequantize(optimized, {"x": np.ones((3, 16), np.float32)})
    # Without onnxruntime's contrib ops: the MatMulInteger that opset 10 has.
    _export(_LinearNet(), torch.randn(3, 16), tmp_path / "static.onnx", opset)
    model = load_model(str(tmp_path / "static.onnx"))
    (quant,) = create_passes("quant:measure=false:format=qoperator")
    assert quant.run(model, PassContext(backend="tvm")).changed
    assert "MatMulInteger" in _ops(model)
    _assert_runs_without_per_axis_dequantize(model, {"x": np.ones((3, 16), np.float32)})


def test_per_channel_asked_for_in_qdq_on_opset_12_moves_the_model_to_13(tmp_path):
    torch.manual_seed(0)
    _export(_SmallCNN(), torch.randn(1, 3, 8, 8), tmp_path / "cnn.onnx", 12)
    optimized, report = onnxforge.optimize(
        tmp_path / "cnn.onnx", "quant:measure=false:format=qdq:granularity=per-channel"
    )
    assert report.passes[0].status == "applied", report.passes[0].error
    assert optimized.graph.opset == 13 and report.passes[0].stats["opset_to"] == 13


# --- 4: constant folding never makes the weights bigger unless asked --------------------------------------


def _matmul_model(nodes, initializers, k: int = 64, n: int = 64) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "fold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "z") if any(o in n.output for n in nodes)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["Tile", "Expand"])
def test_cleanup_does_not_materialize_a_broadcast_of_a_small_constant_feeding_a_matmul(op):
    small = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1, 64), np.float32), "row")
    shape = np.array([64, 1], np.int64) if op == "Tile" else np.array([64, 64], np.int64)
    # A larger weight elsewhere, as real models have: the size limit (the largest weight) would let it fold.
    large = numpy_helper.from_array(np.ones((64, 128), np.float32), "large")
    proto = _matmul_model(
        [
            helper.make_node(op, ["row", "shape"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("MatMul", ["x", "large"], ["z"]),
        ],
        [small, numpy_helper.from_array(shape, "shape"), large],
    )
    before = load_model(proto).stats().bytes
    optimized, _ = onnxforge.optimize(proto, "cleanup", seed=0)
    assert optimized.stats().bytes <= before and op in _ops(optimized)
    allowed, _ = onnxforge.optimize(proto, "cleanup:max_growth=none", seed=0)
    assert op not in _ops(allowed) and allowed.stats().bytes > before


def test_cleanup_does_not_store_a_transposed_copy_of_a_shared_weight():
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64), np.float32), "w")
    proto = _matmul_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
            helper.make_node("MatMul", ["x", "w"], ["z"]),
        ],
        [weight],
    )
    before = load_model(proto).stats().bytes
    optimized, _ = onnxforge.optimize(proto, "cleanup", seed=0)
    assert optimized.stats().bytes == before and "Transpose" in _ops(optimized)


def test_cleanup_folds_a_transpose_of_a_weight_nothing_else_reads():
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64), np.float32), "w")
    proto = _matmul_model(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        [weight],
    )
    optimized, _ = onnxforge.optimize(proto, "cleanup", seed=0)
    assert _ops(optimized) == ["MatMul"] and optimized.stats().bytes == load_model(proto).stats().bytes


def _gate_slices_of_a_bias(bias_read_whole: bool) -> onnx.ModelProto:
    """Four 1 KiB gate slices of a 4 KiB bias, each added to x (as an LSTM's gates are split); with
    `bias_read_whole`, the bias is also added whole elsewhere (as silero-vad's other If branch does)."""
    bias = numpy_helper.from_array(np.random.default_rng(0).standard_normal(1024).astype(np.float32), "bias")
    inits = [bias] + [numpy_helper.from_array(np.array([v], np.int64), n)
                      for n, v in (("s0", 0), ("s1", 256), ("s2", 512), ("s3", 768), ("s4", 1024))]
    nodes = []
    for gate in range(4):
        nodes += [helper.make_node("Slice", ["bias", f"s{gate}", f"s{gate + 1}"], [f"b{gate}"]),
                  helper.make_node("Add", ["x", f"b{gate}"], [f"y{gate}"])]
    nodes.append(helper.make_node("Concat", [f"y{gate}" for gate in range(4)], ["y"], axis=1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1024])]
    if bias_read_whole:
        nodes.append(helper.make_node("Add", ["y", "bias"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 1024]))
    graph = helper.make_graph(nodes, "gates", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cleanup_does_not_store_small_slices_of_a_bias_that_stays():
    proto = _gate_slices_of_a_bias(bias_read_whole=True)
    optimized, _ = onnxforge.optimize(proto, "cleanup", seed=0)
    assert optimized.stats().bytes <= load_model(proto).stats().bytes and "Slice" in _ops(optimized)


def test_cleanup_folds_small_slices_of_a_bias_nothing_else_reads():
    proto = _gate_slices_of_a_bias(bias_read_whole=False)
    optimized, _ = onnxforge.optimize(proto, "cleanup", seed=0)
    assert "Slice" not in _ops(optimized) and optimized.stats().bytes <= load_model(proto).stats().bytes


# --- 6: a weight several layers share is quantized once ---------------------------------------------------


def _shared_weight_chain(op: str) -> onnx.ModelProto:
    """Four layers in a row reading one 128 x 128 weight, as an unrolled recurrent layer's steps do."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((128, 128), np.float32), "w")
    nodes, previous = [], "x"
    for step in range(4):
        attrs = {"transB": 1} if op == "Gemm" else {}
        nodes.append(helper.make_node(op, [previous, "w"], [f"h{step}"], **attrs))
        nodes.append(helper.make_node("Tanh", [f"h{step}"], [f"t{step}"]))
        previous = f"t{step}"
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [2, 128])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_a_weight_four_layers_share_is_quantized_once(op, form):
    proto = _shared_weight_chain(op)
    optimized, report = onnxforge.optimize(proto, f"quant:measure=false:format={form}", seed=0, budget=None)
    assert report.passes[0].status == "applied", report.passes[0].error
    written = optimized.to_proto()
    int8 = [t for t in written.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 1
    # One 16 KiB int8 copy (the float weight is 64 KiB; four int8 copies would be 64 KiB too).
    assert len(written.SerializeToString()) < 20_000 < len(proto.SerializeToString())


# --- 7: weights inside If branches are counted --------------------------------------------------------------


def _if_with_matmul_branches(as_constant_nodes: bool) -> onnx.ModelProto:
    """An If whose branches multiply x by their own 8 x 8 weight: a Constant node (as torch exports them) or an
    initializer of the branch."""

    def branch(name: str, scale: float) -> onnx.GraphProto:
        weight = numpy_helper.from_array(np.full((8, 8), scale, np.float32), f"{name}_w")
        output = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 8])
        if as_constant_nodes:
            nodes = [
                helper.make_node("Constant", [], [f"{name}_w"], value=weight),
                helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"]),
            ]
            return helper.make_graph(nodes, name, [], [output])
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [], [output], [weight])

    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))
    graph = helper.make_graph(
        [node],
        "if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("as_constant_nodes", [True, False])
def test_stats_count_the_weights_inside_if_branches(as_constant_nodes):
    stats = load_model(_if_with_matmul_branches(as_constant_nodes)).stats()
    assert stats.params == 128 and stats.bytes == 512


def _weight_read_by_both_branches() -> onnx.ModelProto:
    """y = If(sum(x) > 0) then x @ W else (x @ W) * 2: one 64 KiB weight of the main graph, read in both branches."""
    weight = np.random.default_rng(3).standard_normal((128, 128)).astype(np.float32)
    out = [helper.make_tensor_value_info("y_b", TensorProto.FLOAT, [1, 128])]
    then_branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y_b"])], "then", [], out)
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "two"], ["y_b"])], "else", [], out
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        "shared_in_branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_both_branches_of_an_if_read_is_stored_once(tmp_path):
    source = _weight_read_by_both_branches()
    path = tmp_path / "out.onnx"

    model, report = onnxforge.optimize(source, "cleanup")
    onnxforge.save_model(model, path)

    assert report.after.bytes == report.before.bytes
    assert path.stat().st_size < 1.2 * len(source.SerializeToString())
    x = np.random.default_rng(4).standard_normal((1, 128)).astype(np.float32)
    for feed in (x, -np.abs(x)):
        want = ort.InferenceSession(source.SerializeToString()).run(None, {"x": feed})[0]
        got = ort.InferenceSession(str(path)).run(None, {"x": feed})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6)


# --- verification that would compare nothing -------------------------------------------------------------


def _nan_on_random_inputs() -> onnx.ModelProto:
    """y = sqrt(x - 100) + 1: NaN for every random input, finite for inputs above 100."""
    nodes = [
        helper.make_node("Sub", ["x", "hundred"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["root"]),
        helper.make_node("Add", ["root", "one"], ["y"]),
        helper.make_node("Identity", ["y"], ["z"]),
    ]
    inits = [numpy_helper.from_array(np.float32(100), "hundred"), numpy_helper.from_array(np.float32(1), "one")]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_output_nan_everywhere_on_random_inputs_is_one_error_pointing_at_data(tmp_path):
    from test_cli import OPTIMIZE, run_cli

    model = tmp_path / "model.onnx"
    onnx.save(_nan_on_random_inputs(), model)

    result = run_cli(OPTIMIZE, model, "--passes", "cleanup", "-o", tmp_path / "out.onnx")

    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the model's output z is NaN or infinite everywhere on random inputs: verification would compare "
        "nothing; give inputs it computes on with --data"
    ]
    assert not (tmp_path / "out.onnx").exists()


def test_the_same_model_verifies_on_samples_it_computes_on():
    samples = [{"x": np.full((2, 3), 101 + i, np.float32)} for i in range(3)]
    optimized, report = onnxforge.optimize(_nan_on_random_inputs(), "cleanup", data=samples, seed=0)
    assert report.passes[0].status == "applied"
