"""quant on layers inside If branches and Loop bodies: weights of the body or of the main graph, both branch outcomes,
Constant-node weights as torch writes them, and what static mode does there."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_checks import constant, op_counts, value_info
from onnx import TensorProto, helper, numpy_helper

import onnxforge
from onnxforge.comparison import compare_outputs

FEATURES = 64
RNG = np.random.default_rng(11)


def _weight(op: str, seed: int) -> np.ndarray:
    shape = (FEATURES, FEATURES) if op == "MatMul" else (FEATURES, FEATURES, 3)
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


def _layer(op: str, x: str, weight: str, y: str) -> onnx.NodeProto:
    return helper.make_node(op, [x, weight], [y], **({"pads": [1, 1]} if op == "Conv" else {}))


def _x_shape(op: str) -> list[int]:
    """MatMul: [4, FEATURES]; Conv (1-D): [1, FEATURES, 16]."""
    return [4, FEATURES] if op == "MatMul" else [1, FEATURES, 16]


def _if_model(op: str, weights_in: str, as_constant_nodes: bool = False) -> onnx.ModelProto:
    """y = If(sum(x) > 0) then layer(x, W_then) else Relu(layer(x, W_else)).

    weights_in="branch": each branch holds its weight (an initializer, or a Constant node as torch writes them);
    "main": both weights are initializers of the main graph, which the branches read.
    """
    out = [value_info("y_b", None)]
    weights = {"then": _weight(op, 1), "else": _weight(op, 2)}

    def branch(name: str, nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
        weight = numpy_helper.from_array(weights[name], f"W_{name}")
        if weights_in == "main":
            return helper.make_graph(nodes, name, [], out)
        if as_constant_nodes:
            holder = helper.make_node("Constant", [], [f"W_{name}"], value=weight)
            return helper.make_graph([holder, *nodes], name, [], out)
        return helper.make_graph(nodes, name, [], out, [weight])

    then_branch = branch("then", [_layer(op, "x", "W_then", "y_b")])
    else_branch = branch("else", [_layer(op, "x", "W_else", "h"), helper.make_node("Relu", ["h"], ["y_b"])])
    main_weights = [constant(f"W_{name}", w) for name, w in weights.items()] if weights_in == "main" else []
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        "if_layers",
        [value_info("x", _x_shape(op))],
        [value_info("y", None)],
        [constant("zero", np.array(0.0, np.float32)), *main_weights],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _loop_model(weights_in: str) -> onnx.ModelProto:
    """h = x; repeated n times: h = Tanh(h @ W); y = h. W in the Loop body or in the main graph."""
    weight = constant("W", _weight("MatMul", 3))
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "W"], ["p"]),
            helper.make_node("Tanh", ["p"], ["h_out"]),
        ],
        "body",
        [value_info("i", [], TensorProto.INT64), value_info("cond_in", [], TensorProto.BOOL), value_info("h_in", None)],
        [value_info("cond_out", [], TensorProto.BOOL), value_info("h_out", None)],
        [weight] if weights_in == "body" else [],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "true", "x"], ["y"], body=body)],  # x is the carried value's start
        "loop_layer",
        [value_info("x", [4, FEATURES])],
        [value_info("y", None)],
        [
            constant("n", np.array(3, np.int64)),
            constant("true", np.array(True)),
            *([weight] if weights_in == "main" else []),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: bytes, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return [dict(zip(names, session.run(None, feed))) for feed in feeds]


def _fresh_inputs_for_both_branches(shape: list[int]) -> list[dict]:
    """Two inputs whose sum is positive (then branch) and two whose sum is negative (else branch)."""
    rng = np.random.default_rng(21)
    values = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    return [{"x": np.abs(v) if i < 2 else -np.abs(v)} for i, v in enumerate(values)]


def _max_rel_error(source: onnx.ModelProto, written: bytes, feeds: list[dict]) -> float:
    return compare_outputs(_run(source.SerializeToString(), feeds), _run(written, feeds)).max_rel


def _int8_weights(proto: onnx.ModelProto) -> list[str]:
    """Names of the int8 tensors of rank 2 or more (weight codes) anywhere in the model."""
    found = []

    def visit(graph: onnx.GraphProto) -> None:
        found.extend(t.name for t in graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(proto.graph)
    return found


@pytest.mark.parametrize("weights_in", ["branch", "main"])
@pytest.mark.parametrize("op", ["MatMul", "Conv"])
def test_layers_in_both_if_branches_are_quantized_counted_and_stay_close(op, weights_in):
    source = _if_model(op, weights_in)
    optimized, report = onnxforge.optimize(source, "quant:measure=false", seed=0)
    record = report.passes[0]
    assert record.status == "applied", record.error
    assert record.stats["layers_in_subgraphs"] == 2 and record.stats["layers_quantized_in_subgraphs"] == 2
    written = optimized.to_proto()
    assert len(_int8_weights(written)) == 2
    assert report.after.bytes < 0.5 * report.before.bytes
    counts = op_counts(optimized)
    assert counts["DynamicQuantizeMatMul" if op == "MatMul" else "DynamicQuantizeLinear"] == 2
    feeds = _fresh_inputs_for_both_branches(_x_shape(op))
    assert _max_rel_error(source, written.SerializeToString(), feeds) < 0.03


def test_weights_that_constant_nodes_hold_in_if_branches_are_quantized():
    source = _if_model("MatMul", "branch", as_constant_nodes=True)
    optimized, report = onnxforge.optimize(source, "quant:measure=false", seed=0)
    assert report.passes[0].stats["layers_quantized_in_subgraphs"] == 2
    assert op_counts(optimized)["DynamicQuantizeMatMul"] == 2 and "Constant" not in op_counts(optimized)
    feeds = _fresh_inputs_for_both_branches(_x_shape("MatMul"))
    assert _max_rel_error(source, optimized.to_proto().SerializeToString(), feeds) < 0.03


@pytest.mark.parametrize("weights_in", ["body", "main"])
def test_a_layer_in_a_loop_body_is_quantized_and_stays_close(weights_in):
    source = _loop_model(weights_in)
    optimized, report = onnxforge.optimize(source, "quant:measure=false", seed=0)
    record = report.passes[0]
    assert record.status == "applied", record.error
    assert record.stats["layers_quantized_in_subgraphs"] == 1
    assert op_counts(optimized)["DynamicQuantizeMatMul"] == 1
    feeds = [{"x": np.random.default_rng(seed).standard_normal((4, FEATURES)).astype(np.float32)} for seed in (1, 2)]
    assert _max_rel_error(source, optimized.to_proto().SerializeToString(), feeds) < 0.03


def test_a_main_graph_weight_both_branches_read_gets_one_int8_copy(tmp_path):
    source = _if_model("MatMul", "main")
    shared = source.graph.node[2]
    for branch in shared.attribute:  # both branches read W_then
        for node in branch.g.node:
            node.input[:] = ["W_then" if name == "W_else" else name for name in node.input]
    del source.graph.initializer[-1]  # W_else, now unread
    optimized, _ = onnxforge.optimize(source, "quant:measure=false", seed=0)
    path = tmp_path / "out.onnx"
    onnxforge.save_model(optimized, path)
    written = onnx.load(path)
    assert _int8_weights(written) == ["W_then_q"]
    assert path.stat().st_size < 0.4 * len(source.SerializeToString())
    feeds = _fresh_inputs_for_both_branches(_x_shape("MatMul"))
    assert _max_rel_error(source, path.read_bytes(), feeds) < 0.03


def test_static_mode_quantizes_the_main_graph_and_says_why_branch_layers_stay_float():
    """A Conv before the If is calibrated; the branches' Convs cannot be observed."""
    source = _if_model("Conv", "branch")
    graph = source.graph
    graph.initializer.append(constant("W_first", _weight("Conv", 4)))
    graph.node.insert(0, _layer("Conv", "x_in", "W_first", "x"))
    graph.input[0].name = "x_in"
    samples = [{"x_in": RNG.standard_normal(_x_shape("Conv")).astype(np.float32)} for _ in range(4)]

    _, report = onnxforge.optimize(source, "quant:mode=static:measure=false", data=samples, seed=0)
    record = report.passes[0]
    assert record.status == "applied", record.error
    assert record.stats["layers_quantized"] == 1 and record.stats["layers_quantized_in_subgraphs"] == 0
    branch_notes = [line for line in record.notes if "(in subgraph" in line]
    assert len(branch_notes) == 2
    assert all("calibration reads values of the main graph only" in line for line in branch_notes)

    _, auto = onnxforge.optimize(source, "quant:measure=false", data=samples, seed=0)
    notes = auto.passes[0].notes
    assert any("(in subgraph then)" in line and "int8 dynamic" in line for line in notes)
    assert any(line.startswith("Conv ") and "(in subgraph" not in line and "int8 static" in line for line in notes)
