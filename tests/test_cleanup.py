"""Each cleanup transformation on a small graph: op counts before and after, and the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graph_checks import apply, max_rel_error, op_counts
from graph_checks import constant as _const
from graph_checks import make_model as _model
from graph_checks import value_info as _vi
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.ir import load_model

FLOAT = TensorProto.FLOAT


# remove-dead -------------------------------------------------------------------------------------


def test_dead_branch_and_unused_initializer_are_removed():
    proto = _model(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Mul", ["x", "w"], ["dead1"]),
            helper.make_node("Sigmoid", ["dead1"], ["dead2"]),
        ],
        [_vi("x", [2, 3])],
        [_vi("y", [2, 3])],
        [_const("w", np.ones((2, 3), np.float32)), _const("unused", np.zeros(5, np.float32))],
    )
    model, result = apply("remove-dead", proto)
    assert op_counts(model) == {"Relu": 1}
    assert result.stats == {"dead_nodes_removed": 2, "initializers_removed": 1}
    assert max_rel_error(proto, model) == 0


def test_unused_graph_inputs_are_kept():
    proto = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2]), _vi("unused", [2])], [_vi("y", [2])])
    model, result = apply("remove-dead", proto)
    assert [t.name for t in model.graph.inputs] == ["x", "unused"]
    assert not result.changed


# remove-identity ---------------------------------------------------------------------------------


def test_identity_chain_is_removed():
    proto = _model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
            helper.make_node("Identity", ["b"], ["c"]),
            helper.make_node("Sigmoid", ["c"], ["y"]),
        ],
        [_vi("x", [4])],
        [_vi("y", [4])],
    )
    model, result = apply("remove-identity", proto)
    assert op_counts(model) == {"Relu": 1, "Sigmoid": 1}
    assert result.stats["identity_nodes_removed"] == 2
    assert max_rel_error(proto, model) == 0


def test_identity_before_graph_output_keeps_the_output_name():
    proto = _model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Identity", ["a"], ["y"]),
            helper.make_node("Sigmoid", ["a"], ["z"]),
        ],
        [_vi("x", [4])],
        [_vi("y", [4]), _vi("z", [4])],
    )
    model, _ = apply("remove-identity", proto)
    assert op_counts(model) == {"Relu": 1, "Sigmoid": 1}
    assert [t.name for t in model.graph.outputs] == ["y", "z"]
    assert max_rel_error(proto, model) == 0


def test_identity_from_graph_input_to_graph_output_is_kept():
    proto = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", [4])], [_vi("y", [4])])
    model, result = apply("remove-identity", proto)
    assert op_counts(model) == {"Identity": 1} and not result.changed


def test_identity_sharing_a_weight_is_removed():
    # PyTorch exports tied weights as Identity(initializer).
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    proto = _model(
        [
            helper.make_node("Identity", ["w"], ["w_tied"]),
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("MatMul", ["a", "w_tied"], ["y"]),
        ],
        [_vi("x", [2, 4])],
        [_vi("y", [2, 4])],
        [_const("w", w)],
    )
    model, _ = apply("remove-identity", proto)
    assert op_counts(model) == {"MatMul": 2}
    assert max_rel_error(proto, model) == 0


def test_inference_dropout_is_removed_but_training_dropout_is_kept():
    proto = _model(
        [
            helper.make_node("Dropout", ["x"], ["a"]),
            helper.make_node("Dropout", ["a", "ratio", "training"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        [_vi("x", [4]), _vi("training", [], TensorProto.BOOL)],
        [_vi("y", [4])],
        [_const("ratio", np.array(0.5, np.float32))],
    )
    model, result = apply("remove-identity", proto)
    assert op_counts(model) == {"Dropout": 1, "Relu": 1}
    assert result.stats["identity_nodes_removed"] == 1


def _if_model(then_nodes) -> onnx.ModelProto:
    """y = If(cond, then: `then_nodes` computing t_out from x, else: Abs(x))."""
    then_graph = helper.make_graph(then_nodes, "then", [], [_vi("t_out", [4])])
    else_graph = helper.make_graph([helper.make_node("Abs", ["x"], ["e_out"])], "else", [], [_vi("e_out", [4])])
    return _model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [_vi("x", [4]), _vi("cond", [], TensorProto.BOOL)],
        [_vi("y", [4])],
    )


def test_identity_inside_an_if_branch_is_removed():
    proto = _if_model([helper.make_node("Identity", ["x"], ["t1"]), helper.make_node("Neg", ["t1"], ["t_out"])])
    model, _ = apply("remove-identity", proto)
    assert op_counts(model) == {"If": 1, "Neg": 1, "Abs": 1}
    assert max_rel_error(proto, model) == 0


# fold-constants ----------------------------------------------------------------------------------


def test_constant_subexpression_is_folded():
    proto = _model(
        [
            helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", FLOAT, [4], [1, 2, 3, 4])),
            helper.make_node("Mul", ["c", "two"], ["c2"]),
            helper.make_node("Sqrt", ["c2"], ["c3"]),
            helper.make_node("Add", ["x", "c3"], ["y"]),
        ],
        [_vi("x", [4])],
        [_vi("y", [4])],
        [_const("two", np.array(2.0, np.float32))],
    )
    model, result = apply("fold-constants", proto)
    assert op_counts(model) == {"Add": 1}
    assert result.stats["nodes_removed"] == 3
    folded = model.graph.nodes[0].inputs[1]
    np.testing.assert_allclose(folded.values, np.sqrt(np.array([2, 4, 6, 8], np.float32)))
    assert max_rel_error(proto, model) < 1e-6


def test_folding_that_would_create_a_large_weight_is_skipped():
    proto = _model(
        [
            helper.make_node("Expand", ["one", "shape"], ["big"]),
            helper.make_node("Add", ["x", "big"], ["y"]),
        ],
        [_vi("x", [64, 64])],
        [_vi("y", [64, 64])],
        [_const("one", np.ones(1, np.float32)), _const("shape", np.array([64, 64], np.int64))],
    )
    model, result = apply("fold-constants", proto)
    assert op_counts(model) == {"Expand": 1, "Add": 1} and not result.changed
    model, result = apply("fold-constants:max_bytes=16384", proto)  # within the size limit, but it grows
    assert op_counts(model) == {"Expand": 1, "Add": 1} and not result.changed
    model, result = apply("fold-constants:max_bytes=16384:max_growth=16384", proto)
    assert op_counts(model) == {"Add": 1}


def test_quantization_and_random_nodes_are_not_folded():
    proto = _model(
        [
            helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("RandomUniform", [], ["noise"], shape=[2, 4]),
            helper.make_node("Add", ["a", "noise"], ["y"]),
        ],
        [_vi("x", [2, 4])],
        [_vi("y", [2, 4])],
        [_const("wq", np.ones((4, 4), np.int8)), _const("scale", np.array(0.1, np.float32))],
    )
    model, result = apply("fold-constants", proto)
    assert op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1, "RandomUniform": 1, "Add": 1}
    assert not result.changed


# fold-shapes -------------------------------------------------------------------------------------


def _flatten_by_shape(batch) -> onnx.ModelProto:
    """y = Reshape(x, [x.shape[0], -1]): the shape arithmetic PyTorch exports for x.view(x.size(0), -1)."""
    return _model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [_vi("x", [batch, 3, 4])],
        [_vi("y", [batch, 12])],
        [
            _const("zero", np.array(0, np.int64)),
            _const("axes", np.array([0], np.int64)),
            _const("minus_one", np.array([-1], np.int64)),
        ],
    )


def test_static_shape_computation_folds_to_a_constant_reshape():
    proto = _flatten_by_shape(2)
    model, result = apply("cleanup", proto)
    assert op_counts(model) == {"Reshape": 1}
    np.testing.assert_array_equal(model.graph.nodes[0].inputs[1].values, [2, -1])
    assert result.stats["shape_nodes_folded"] == 1
    assert max_rel_error(proto, model) == 0


def test_dynamic_shape_computation_is_left_alone():
    proto = _flatten_by_shape("batch")
    model, result = apply("cleanup", proto)
    assert op_counts(model)["Shape"] == 1
    assert max_rel_error(proto, model) == 0


def test_shape_with_start_and_end_folds_to_the_slice_of_dims():
    proto = _model(
        [
            helper.make_node("Shape", ["x"], ["s"], start=1, end=-1),
            helper.make_node("Cast", ["s"], ["sf"], to=FLOAT),
            helper.make_node("ReduceSum", ["x", "axes"], ["r"], keepdims=0),
            helper.make_node("Add", ["r", "sf"], ["y"]),
        ],
        [_vi("x", [2, 3, 5, 7])],
        [_vi("y", [2])],
        [_const("axes", np.array([1, 2, 3], np.int64))],
        opset=18,
    )
    model, _ = apply("cleanup", proto)
    assert op_counts(model) == {"ReduceSum": 1, "Add": 1}
    np.testing.assert_array_equal(model.graph.nodes[1].inputs[1].values, [3, 5])


def test_zero_conv_bias_cast_like_a_dynamic_input_folds_and_batchnorm_folds_into_the_conv():
    """The dynamo exporter without its optimizer writes a Conv's zero bias as Expand(CastLike(0, x), [C])."""
    rng = np.random.default_rng(0)
    proto = _model(
        [
            helper.make_node("CastLike", ["zero", "x"], ["zero_like_x"]),
            helper.make_node("Expand", ["zero_like_x", "channels"], ["bias"]),
            helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"]),
        ],
        [_vi("x", ["batch", 3, "height", "width"])],
        [_vi("y", ["batch", 4, "height", "width"])],
        [
            _const("zero", np.array(0.0, np.float64)),
            _const("channels", np.array([4], np.int64)),
            _const("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
            *(_const(n, rng.uniform(0.5, 1.5, 4).astype(np.float32)) for n in ("scale", "shift", "mean", "var")),
        ],
    )
    model, report = optimize(proto, "cleanup,fold-batchnorm", shapes={"x": [2, 3, 8, 8]}, seed=0)
    assert [r.status for r in report.passes] == ["applied", "applied"]
    assert op_counts(model) == {"Conv": 1}


# merge-initializers ------------------------------------------------------------------------------


def test_identical_weights_are_merged_and_different_ones_kept():
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    proto = _model(
        [
            helper.make_node("MatMul", ["x", "w_a"], ["a"]),
            helper.make_node("MatMul", ["a", "w_b"], ["b"]),
            helper.make_node("MatMul", ["b", "w_c"], ["c"]),
            helper.make_node("Add", ["c", "bias_i"], ["y"]),
        ],
        [_vi("x", [2, 4])],
        [_vi("y", [2, 4])],
        [
            _const("w_a", w),
            _const("w_b", w.copy()),
            _const("w_c", w + 1),
            # Same bytes as nothing else: an int32 view of w's first row must not merge with floats.
            _const("bias_i", np.zeros(4, np.float32)),
        ],
    )
    model, result = apply("merge-initializers", proto)
    assert result.stats["initializers_merged"] == 1
    assert result.stats["bytes_saved"] == 64
    names = [n.inputs[1].name for n in model.graph.nodes]
    assert names[0] == names[1] != names[2]
    assert len(model.to_proto().graph.initializer) == 3
    assert max_rel_error(proto, model) == 0


def test_equal_bytes_with_another_dtype_are_not_merged():
    proto = _model(
        [
            helper.make_node("Add", ["x", "f"], ["a"]),
            helper.make_node("Cast", ["a"], ["ai"], to=TensorProto.INT32),
            helper.make_node("Add", ["ai", "i"], ["y"]),
        ],
        [_vi("x", [2])],
        [_vi("y", [2], TensorProto.INT32)],
        [_const("f", np.zeros(2, np.float32)), _const("i", np.zeros(2, np.int32))],
    )
    _, result = apply("merge-initializers", proto)
    assert not result.changed


# cleanup umbrella and properties -----------------------------------------------------------------


def test_cleanup_through_the_pass_manager_is_verified_and_applied():
    proto = _flatten_by_shape(2)
    model, report = optimize(proto, "cleanup", seed=0)
    (record,) = report.passes
    assert record.status == "applied"
    assert record.before.nodes == 5 and record.after.nodes == 1
    assert report.error.max_rel == 0


_UNARY = ["Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Identity"]


@st.composite
def _random_chains(draw):
    """A chain of unary ops over x, some binary ops with constant subexpressions, and Identity sprinkled in."""
    nodes, inits, current = [], [], "x"
    for i in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["unary", "const_add", "identity_out"]))
        out = f"t{i}"
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(_UNARY)), [current], [out]))
        elif kind == "const_add":
            a, b = draw(st.floats(-2, 2, width=32)), draw(st.floats(-2, 2, width=32))
            inits += [_const(f"a{i}", np.full(3, a, np.float32)), _const(f"b{i}", np.full(3, b, np.float32))]
            nodes.append(helper.make_node("Mul", [f"a{i}", f"b{i}"], [f"ab{i}"]))
            nodes.append(helper.make_node("Add", [current, f"ab{i}"], [out]))
        else:
            nodes.append(helper.make_node("Identity", [current], [out]))
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    return _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], inits)


@settings(max_examples=25, deadline=None)
@given(_random_chains())
def test_cleanup_preserves_outputs_and_never_adds_nodes(proto):
    model, _ = apply("cleanup", proto)
    assert model.stats().nodes <= len(proto.graph.node)
    assert not any(n.op == "Identity" for n in model.graph.nodes if n.outputs[0].name != "y")
    assert max_rel_error(proto, model) < 1e-6
    onnx.checker.check_model(model.to_proto())


def test_cleanup_of_a_clean_model_changes_nothing():
    proto = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [4])], [_vi("y", [4])])
    model, result = apply("cleanup", proto)
    assert not result.changed
    assert isinstance(model.graph.nodes[0].inputs[0], gs.Variable)
    assert load_model(proto).stats() == model.stats()


def test_a_scalar_and_a_one_element_vector_are_not_merged():
    proto = _model(
        [
            helper.make_node("Gather", ["x", "k"], ["g"]),
            helper.make_node("Concat", ["n", "v"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [_vi("x", [4])],
        [_vi("y", [2, 2]), _vi("g", [])],
        [
            _const("k", np.array(2, np.int64)),
            _const("n", np.array([2], np.int64)),
            _const("v", np.array([2], np.int64)),
        ],
    )
    model, result = apply("merge-initializers", proto)
    assert result.stats["initializers_merged"] == 1  # n and v, not the scalar k
    assert tuple(model.graph.nodes[0].inputs[1].shape) == ()
    assert max_rel_error(proto, model) == 0


def test_string_weights_are_left_alone_by_merging():
    labels = numpy_helper.from_array(np.array(["a", "b"], dtype=object), "labels")
    labels2 = numpy_helper.from_array(np.array(["a", "b"], dtype=object), "labels2")
    proto = _model(
        [
            helper.make_node("Concat", ["labels", "labels2"], ["both"], axis=0),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        [_vi("x", [2])],
        [_vi("y", [2]), _vi("both", [4], TensorProto.STRING)],
        [labels, labels2],
    )
    model, result = apply("merge-initializers", proto)
    assert not result.changed


def test_a_transposed_weight_that_is_also_used_directly_is_not_stored_twice():
    # Tied weights: the embedding table is used as it is and, transposed, as the output projection.
    table = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    proto = _model(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"]),
            helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["emb", "table_t"], ["y"]),
        ],
        [_vi("ids", [3], TensorProto.INT64)],
        [_vi("y", [3, 32])],
        [_const("table", table)],
    )
    model, result = apply("fold-constants", proto)
    assert op_counts(model)["Transpose"] == 1 and not result.changed
    assert model.stats().bytes == table.nbytes


def test_constants_inside_an_if_branch_are_folded():
    proto = _if_model(
        [
            helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", FLOAT, [4], [1, 2, 3, 4])),
            helper.make_node("Neg", ["c"], ["minus_c"]),
            helper.make_node("Add", ["x", "minus_c"], ["t_out"]),
        ]
    )
    model, result = apply("fold-constants", proto)
    assert op_counts(model) == {"If": 1, "Add": 1, "Abs": 1}
    assert result.stats["nodes_removed"] == 2
    x = np.zeros(4, np.float32)
    out = get_backend("ort").prepare(model).run({"x": x, "cond": np.array(True)})["y"]
    np.testing.assert_array_equal(out, [-1, -2, -3, -4])
