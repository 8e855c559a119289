"""cse: duplicated nodes become one, on small graphs and PyTorch exports; the outputs stay bit-identical."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_checks import apply, max_rel_error, op_counts
from graph_checks import constant as _const
from graph_checks import make_model as _model
from graph_checks import value_info as _vi
from hypothesis import given, settings
from hypothesis import strategies as st
from model_builders import torch_cases
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import load_model
from onnxforge.passes.fusion import FUSION_STAGES
from onnxforge.passes.fusion.cse import COMMUTATIVE_OPS

FLOAT = TensorProto.FLOAT


def test_cse_runs_first_inside_fuse():
    assert FUSION_STAGES[0].name == "cse"


def test_duplicate_transposes_of_one_input_become_one_and_their_consumers_follow():
    proto = _model(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
            helper.make_node("Transpose", ["x"], ["t2"], perm=[1, 0]),
            helper.make_node("Relu", ["t1"], ["r1"]),
            helper.make_node("Relu", ["t2"], ["r2"]),
            helper.make_node("Sub", ["r1", "r2"], ["y"]),
        ],
        [_vi("x", [3, 5])],
        [_vi("y", [5, 3])],
    )
    model, result = apply("cse", proto)
    # The two Relus become one once their inputs are the same tensor: the chain collapses in one run.
    assert op_counts(model) == {"Transpose": 1, "Relu": 1, "Sub": 1}
    assert result.stats == {"cse_nodes_merged": 2}
    assert max_rel_error(proto, model) == 0


def test_commutative_ops_match_with_their_inputs_swapped_and_others_do_not():
    scale = _const("c", np.array([2.0, 3.0], np.float32))
    proto = _model(
        [
            helper.make_node("Add", ["x", "z"], ["a1"]),
            helper.make_node("Add", ["z", "x"], ["a2"]),
            helper.make_node("Mul", ["x", "c"], ["m1"]),
            helper.make_node("Mul", ["c", "x"], ["m2"]),
            helper.make_node("Sub", ["x", "z"], ["s1"]),
            helper.make_node("Sub", ["z", "x"], ["s2"]),  # not commutative: both stay
            helper.make_node("Concat", ["a1", "a2", "m1", "m2", "s1", "s2"], ["y"], axis=0),
        ],
        [_vi("x", [3, 2]), _vi("z", [3, 2])],
        [_vi("y", [18, 2])],
        [scale],
    )
    model, result = apply("cse", proto)
    assert op_counts(model) == {"Add": 1, "Mul": 1, "Sub": 2, "Concat": 1}
    assert result.stats == {"cse_nodes_merged": 2}
    assert max_rel_error(proto, model) == 0


def test_other_attributes_keep_nodes_apart():
    proto = _model(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]),
            helper.make_node("Transpose", ["x"], ["t2"], perm=[0, 2, 1]),
            helper.make_node("Softmax", ["x"], ["s1"], axis=-1),
            helper.make_node("Softmax", ["x"], ["s2"], axis=1),
            helper.make_node("Softmax", ["x"], ["s3"]),  # the default axis, written differently: kept too
        ],
        [_vi("x", [2, 2, 2])],
        [_vi(n, None) for n in ("t1", "t2", "s1", "s2", "s3")],
    )
    model, result = apply("cse", proto)
    assert not result.changed
    assert op_counts(model) == {"Transpose": 2, "Softmax": 3}


def _shape_slice_reshape(copies: int) -> onnx.ModelProto:
    """`copies` identical Shape -> Slice -> Concat -> Reshape branches of x (batch dynamic), summed."""
    nodes = []
    for i in range(copies):
        nodes += [
            helper.make_node("Shape", ["x"], [f"shape{i}"]),
            helper.make_node("Slice", [f"shape{i}", f"zero{i}", f"one{i}"], [f"batch{i}"]),
            helper.make_node("Concat", [f"batch{i}", f"minus_one{i}"], [f"target{i}"], axis=0),
            helper.make_node("Reshape", ["x", f"target{i}"], [f"flat{i}"]),
        ]
    nodes.append(helper.make_node("Sum", [f"flat{i}" for i in range(copies)], ["y"]))
    weights = []
    for i in range(copies):  # equal constants under different names, as exporters write them
        weights += [
            _const(f"zero{i}", np.array([0], np.int64)),
            _const(f"one{i}", np.array([1], np.int64)),
            _const(f"minus_one{i}", np.array([-1], np.int64)),
        ]
    return _model(nodes, [_vi("x", ["n", 3, 4])], [_vi("y", ["n", 12])], weights)


def test_duplicate_shape_slice_chains_reading_equal_constants_collapse():
    proto = _shape_slice_reshape(3)
    model, result = apply("cse", proto)
    assert op_counts(model) == {"Shape": 1, "Slice": 1, "Concat": 1, "Reshape": 1, "Sum": 1}
    assert result.stats == {"cse_nodes_merged": 8}
    assert max_rel_error(proto, model) == 0


def test_cleanup_then_fuse_is_verified_and_applied():
    proto = _shape_slice_reshape(2)
    model, report = optimize(proto, "cleanup,cse", seed=0)
    assert [r.status for r in report.passes] == ["applied", "applied"]
    assert op_counts(model) == {"Shape": 1, "Slice": 1, "Concat": 1, "Reshape": 1, "Sum": 1}
    _, fused = optimize(proto, "cleanup,fuse", seed=0)
    assert fused.passes[1].status == "applied" and fused.passes[1].stats["cse_nodes_merged"] == 4


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (np.array([1.0, 2.0], np.float32), np.array([1.0, 2.5], np.float32)),
        (np.array([0.0], np.float32), np.array([-0.0], np.float32)),  # equal values, different bytes
        (np.array(1.0, np.float32), np.array([1.0], np.float32)),  # a scalar and a one-element vector
    ],
)
def test_constants_that_differ_in_bytes_or_shape_keep_nodes_apart(a, b):
    proto = _model(
        [helper.make_node("Mul", ["x", "a"], ["y1"]), helper.make_node("Mul", ["x", "b"], ["y2"])],
        [_vi("x", [2])],
        [_vi("y1", None), _vi("y2", None)],
        [_const("a", a), _const("b", b)],
    )
    model, result = apply("cse", proto)
    assert not result.changed
    assert op_counts(model) == {"Mul": 2}


def test_constants_with_equal_bytes_but_another_dtype_keep_nodes_apart():
    one = np.array([1.0], np.float32)
    proto = _model(
        [helper.make_node("Neg", ["f"], ["y1"]), helper.make_node("Neg", ["i"], ["y2"])],
        [],
        [_vi("y1", [1]), _vi("y2", [1], TensorProto.INT32)],
        [_const("f", one), _const("i", one.view(np.int32))],
    )
    model, result = apply("cse", proto)
    assert not result.changed
    assert op_counts(model) == {"Neg": 2}


def test_random_ops_and_dropout_are_never_merged():
    proto = _model(
        [
            helper.make_node("RandomUniformLike", ["x"], ["r1"], seed=1.0),
            helper.make_node("RandomUniformLike", ["x"], ["r2"], seed=1.0),
            helper.make_node("Bernoulli", ["p"], ["b1"], seed=1.0),
            helper.make_node("Bernoulli", ["p"], ["b2"], seed=1.0),
            helper.make_node("Dropout", ["x", "ratio", "train"], ["d1"]),
            helper.make_node("Dropout", ["x", "ratio", "train"], ["d2"]),
            helper.make_node("Dropout", ["x", "ratio", "infer"], ["e1"]),
            helper.make_node("Dropout", ["x", "ratio", "infer"], ["e2"]),
            helper.make_node("Sum", ["r1", "r2", "b1", "b2", "d1", "d2", "e1", "e2"], ["y"]),
        ],
        [_vi("x", [2, 3]), _vi("p", [2, 3])],
        [_vi("y", [2, 3])],
        [
            _const("ratio", np.array(0.5, np.float32)),
            _const("train", np.array(True)),
            _const("infer", np.array(False)),
        ],
    )
    model, result = apply("cse", proto)
    # Inference-mode Dropout too: cleanup removes it, and a training_mode input may not be constant.
    assert not result.changed
    assert op_counts(model) == {"RandomUniformLike": 2, "Bernoulli": 2, "Dropout": 4, "Sum": 1}


def test_nodes_of_unknown_domains_are_never_merged():
    nodes = [helper.make_node("Counter", ["x"], [f"c{i}"], domain="my.ops") for i in range(2)]
    model, result = apply("cse", _model(nodes, [_vi("x", [2])], [_vi("c0", [2]), _vi("c1", [2])]))
    assert not result.changed and len(model.graph.nodes) == 2


def test_a_duplicate_writing_a_graph_output_keeps_the_output_name():
    proto = _model(
        [
            helper.make_node("Neg", ["x"], ["inner"]),
            helper.make_node("Exp", ["inner"], ["used"]),
            helper.make_node("Neg", ["x"], ["y"]),  # the duplicate is the graph output
        ],
        [_vi("x", [4])],
        [_vi("y", [4]), _vi("used", [4])],
    )
    model, _ = apply("cse", proto)
    assert op_counts(model) == {"Neg": 1, "Exp": 1}
    assert [t.name for t in model.graph.outputs] == ["y", "used"]
    assert model.graph.outputs[0].inputs[0].op == "Neg"
    assert max_rel_error(proto, model) == 0


def test_two_graph_outputs_computed_alike_both_stay():
    proto = _model(
        [helper.make_node("Neg", ["x"], ["y1"]), helper.make_node("Neg", ["x"], ["y2"])],
        [_vi("x", [4])],
        [_vi("y1", [4]), _vi("y2", [4])],
    )
    model, result = apply("cse", proto)
    assert not result.changed and op_counts(model) == {"Neg": 2}


def _if_model() -> onnx.ModelProto:
    """Two Negs of x outside; each branch reads one of them, and the then-branch has a duplicate pair inside."""
    then_graph = helper.make_graph(
        [
            helper.make_node("Abs", ["n2"], ["a1"]),
            helper.make_node("Abs", ["n2"], ["a2"]),
            helper.make_node("Mul", ["a1", "a2"], ["t_out"]),
        ],
        "then",
        [],
        [_vi("t_out", [4])],
    )
    else_graph = helper.make_graph([helper.make_node("Relu", ["n1"], ["e_out"])], "else", [], [_vi("e_out", [4])])
    branches = {"then_branch": then_graph, "else_branch": else_graph}
    return _model(
        [
            helper.make_node("Neg", ["x"], ["n1"]),
            helper.make_node("Neg", ["x"], ["n2"]),
            helper.make_node("If", ["cond"], ["y1"], **branches),
            helper.make_node("If", ["cond"], ["y2"], **branches),  # same branches: still kept (subgraphs)
            helper.make_node("Add", ["y1", "y2"], ["y"]),
        ],
        [_vi("x", [4]), _vi("cond", [], TensorProto.BOOL)],
        [_vi("y", [4])],
    )


def test_duplicates_read_inside_if_branches_and_inside_a_branch_are_merged_but_if_nodes_are_not():
    proto = _if_model()
    model, result = apply("cse", proto)
    # Outer: one Neg removed. Each If body: its Abs pair becomes one (both If nodes have a copy of the body).
    assert result.stats == {"cse_nodes_merged": 3}
    assert op_counts(model) == {"Neg": 1, "If": 2, "Add": 1, "Abs": 2, "Mul": 2, "Relu": 2}
    for cond in (True, False):
        feeds = {"x": np.linspace(-2, 2, 4, dtype=np.float32), "cond": np.array(cond)}
        assert _run(proto, feeds) == pytest.approx(_run(model.to_proto(), feeds), abs=0)


def _run(proto: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime

    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0].tolist()


def _layers_recomputing_the_mask_bias(layers: int) -> onnx.ModelProto:
    """Each layer turns the int mask into an additive bias anew, then softmaxes x @ W_l + bias."""
    nodes, weights = [], [_const("axes", np.array([1], np.int64))]
    rng = np.random.default_rng(0)
    h = "x"
    for i in range(layers):
        weights += [_const(f"one{i}", np.array(1.0, np.float32)), _const(f"big{i}", np.array(-1e4, np.float32))]
        weights.append(_const(f"w{i}", rng.standard_normal((8, 8)).astype(np.float32)))
        nodes += [
            helper.make_node("Unsqueeze", ["mask", "axes"], [f"m{i}"]),
            helper.make_node("Cast", [f"m{i}"], [f"mf{i}"], to=FLOAT),
            helper.make_node("Sub", [f"one{i}", f"mf{i}"], [f"inv{i}"]),
            helper.make_node("Mul", [f"inv{i}", f"big{i}"], [f"bias{i}"]),
            helper.make_node("MatMul", [h, f"w{i}"], [f"s{i}"]),
            helper.make_node("Add", [f"s{i}", f"bias{i}"], [f"sb{i}"]),
            helper.make_node("Softmax", [f"sb{i}"], [f"h{i}"], axis=-1),
        ]
        h = f"h{i}"
    return _model(
        nodes,
        [_vi("x", ["n", 4, 8]), _vi("mask", ["n", 8], TensorProto.INT64)],
        [_vi(h, ["n", 4, 8])],
        weights,
    )


def test_a_branch_duplicated_in_every_layer_is_computed_once():
    proto = _layers_recomputing_the_mask_bias(4)
    model, result = apply("cse", proto)
    assert op_counts(model) == {"Unsqueeze": 1, "Cast": 1, "Sub": 1, "Mul": 1, "MatMul": 4, "Add": 4, "Softmax": 4}
    assert result.stats == {"cse_nodes_merged": 12}
    assert max_rel_error(proto, model) == 0


@pytest.mark.parametrize("name", ["transformer", "bert"])
def test_shape_arithmetic_duplicated_in_pytorch_exports_with_dynamic_shapes_is_merged(name):
    case = torch_cases()[name]
    exported = from_torch(
        case.module,
        case.example_inputs,
        case.input_names,
        case.output_names,
        dynamic_axes={n: {0: "batch"} for n in case.input_names},
    )
    cleaned, _ = optimize(exported, "cleanup", seed=0)
    optimized, report = optimize(cleaned, "cleanup,cse", seed=0)
    assert [r.status for r in report.passes] == ["unchanged", "applied"]
    before, after = op_counts(cleaned), op_counts(optimized)
    # The exporter reads x's shape once per dimension it needs, and unsqueezes each dimension once per use.
    assert after["Shape"] < before["Shape"] and after["Unsqueeze"] < before["Unsqueeze"]
    assert report.passes[1].stats["cse_nodes_merged"] >= 20
    assert report.error.max_rel < 1e-4


# --- property: random DAGs with duplicated nodes ------------------------------------------------------------

UNARY = ("Relu", "Neg", "Abs", "Sin", "Cos", "Sigmoid")
BINARY = ("Add", "Mul", "Sub", "Max")


@st.composite
def _dags_with_duplicates(draw):
    """A random DAG on [3, 4] tensors where some nodes repeat an earlier node (same op and inputs)."""
    tensors = ["x", "z"]
    nodes, weights = [], []
    for i in range(draw(st.integers(3, 14))):
        out = f"t{i}"
        earlier = [n for n in nodes if n.op_type != "Sum"]
        if earlier and draw(st.booleans()):
            copy = draw(st.sampled_from(earlier))
            nodes.append(helper.make_node(copy.op_type, list(copy.input), [out]))
        elif draw(st.integers(0, 3)) == 0:
            # x * c with a constant of one of two values, each time a new initializer
            name = f"c{i}"
            weights.append(_const(name, np.full((3, 4), draw(st.sampled_from([0.5, 2.0])), np.float32)))
            nodes.append(helper.make_node("Mul", [draw(st.sampled_from(tensors)), name], [out]))
        elif draw(st.booleans()):
            nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [draw(st.sampled_from(tensors))], [out]))
        else:
            args = [draw(st.sampled_from(tensors)), draw(st.sampled_from(tensors))]
            nodes.append(helper.make_node(draw(st.sampled_from(BINARY)), args, [out]))
        tensors.append(out)
    nodes.append(helper.make_node("Sum", tensors[2:], ["y"]))
    return _model(nodes, [_vi("x", [3, 4]), _vi("z", [3, 4])], [_vi("y", [3, 4])], weights)


def _distinct_expressions(proto: onnx.ModelProto) -> int:
    """How many different computations the graph's nodes make (value numbering; constants by value; the inputs of
    commutative ops in any order)."""
    weights = {w.name: numpy_helper.to_array(w).tobytes() for w in proto.graph.initializer}
    number: dict[str, object] = {}
    for node in proto.graph.node:
        inputs = tuple(("w", weights[n]) if n in weights else number.get(n, n) for n in node.input)
        if node.op_type in COMMUTATIVE_OPS:
            inputs = tuple(sorted(inputs, key=repr))
        number[node.output[0]] = (node.op_type, inputs)
    return len({number[n.output[0]] for n in proto.graph.node})


@settings(max_examples=30, deadline=None)
@given(_dags_with_duplicates())
def test_cse_keeps_one_node_per_distinct_computation_and_the_same_outputs(proto):
    model, result = apply("cse", proto)
    assert len(model.graph.nodes) == _distinct_expressions(proto)
    assert result.changed == (len(model.graph.nodes) < len(proto.graph.node))
    onnx.checker.check_model(model.to_proto())
    assert max_rel_error(proto, model) == 0
    again = load_model(model.to_proto())
    assert not apply("cse", again.to_proto())[1].changed
