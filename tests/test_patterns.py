"""The rewrite-rule matcher: patterns in ONNX ops, commutativity, literals, bindings, self-containment."""

from __future__ import annotations

import math

import numpy as np
import onnx
from graph_checks import max_rel_error, op_counts
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxforge.ir import load_model
from onnxforge.ir.patterns import RewriteRule, apply_rules

SQRT2 = math.sqrt(2.0)


def _model(nodes, outputs=("y",), initializers=(), opset=20) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _scalar(name, value):
    return numpy_helper.from_array(np.array(value, np.float32), name)


def erf_gelu(op, x):
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Div(x, SQRT2)), 1.0))


def fused_gelu(op, x):
    return op.Gelu(x)


GELU = RewriteRule("gelu", erf_gelu, fused_gelu)


def _gelu_nodes(swap_outer=False, swap_add=False, half_first=False, divisor="sqrt2"):
    half = ["half", "x"] if half_first else ["x", "half"]
    add = ["one", "e"] if swap_add else ["e", "one"]
    outer = ["a", "h"] if swap_outer else ["h", "a"]
    return [
        helper.make_node("Div", ["x", divisor], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", add, ["a"]),
        helper.make_node("Mul", half, ["h"]),
        helper.make_node("Mul", outer, ["y"]),
    ]


_GELU_CONSTANTS = [_scalar("sqrt2", 1.4142135), _scalar("one", 1.0), _scalar("half", 0.5), _scalar("three", 3.0)]


@settings(max_examples=16, deadline=None)
@given(st.booleans(), st.booleans(), st.booleans())
def test_a_pattern_matches_every_order_of_commutative_inputs(swap_outer, swap_add, half_first):
    proto = _model(_gelu_nodes(swap_outer, swap_add, half_first), initializers=_GELU_CONSTANTS)
    model = load_model(proto)
    counts = apply_rules([model.graph], [GELU])
    assert counts == {"gelu": 1}
    assert op_counts(model) == {"Gelu": 1}
    assert [t.name for t in model.graph.outputs] == ["y"]
    assert max_rel_error(proto, model) < 1e-6


def test_a_literal_of_another_value_does_not_match():
    proto = _model(_gelu_nodes(divisor="three"), initializers=_GELU_CONSTANTS)
    model = load_model(proto)
    assert not apply_rules([model.graph], [GELU])
    assert op_counts(model)["Erf"] == 1


def test_no_match_when_an_inner_value_is_used_outside_the_pattern():
    nodes = _gelu_nodes() + [helper.make_node("Relu", ["e"], ["side"])]
    proto = _model(nodes, outputs=("y", "side"), initializers=_GELU_CONSTANTS)
    model = load_model(proto)
    assert not apply_rules([model.graph], [GELU])


def test_no_match_when_a_variable_would_bind_two_different_values():
    nodes = [
        helper.make_node("Neg", ["x"], ["other"]),
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Mul", ["other", "s"], ["y"]),
    ]
    silu = RewriteRule("silu", lambda op, x: op.Mul(x, op.Sigmoid(x)), lambda op, x: op.Swish(x))
    model = load_model(_model(nodes))
    assert not apply_rules([model.graph], [silu])


def test_const_binds_weights_and_the_replacement_computes_new_ones():
    # (x @ W) * s with a constant s folds into x @ (W * s).
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    s = np.linspace(0.5, 2.0, 8).astype(np.float32)
    proto = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "s"], ["y"])],
        initializers=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s")],
    )

    rule = RewriteRule(
        "fold-scale",
        lambda op, x: op.Mul(op.MatMul(x, op.const("w")), op.const("s")),
        lambda op, x, w, s: op.MatMul(x, op.const(w.values * s.values, "w_scaled")),
    )
    model = load_model(proto)
    assert apply_rules([model.graph], [rule]) == {"fold-scale": 1}
    assert op_counts(model) == {"MatMul": 1}
    assert max_rel_error(proto, model) < 1e-5


def test_a_condition_can_refuse_a_match():
    proto = _model(_gelu_nodes(), initializers=_GELU_CONSTANTS)
    refusing = RewriteRule("gelu", erf_gelu, fused_gelu, condition=lambda match, x: x.name != "x")
    model = load_model(proto)
    assert not apply_rules([model.graph], [refusing])


def test_a_replacement_may_return_an_existing_value():
    # Transpose(Transpose(x, p), inverse p) is x; when that is a graph output, an Identity keeps its name.
    proto = _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
            helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0]),
        ]
    )
    rule = RewriteRule(
        "transpose-pair",
        lambda op, x: op.Transpose(op.Transpose(x, perm=[1, 0]), perm=[1, 0]),
        lambda op, x: x,
    )
    model = load_model(proto)
    assert apply_rules([model.graph], [rule]) == {"transpose-pair": 1}
    assert op_counts(model) == {"Identity": 1}
    assert max_rel_error(proto, model) == 0


def test_attributes_given_as_predicates():
    proto = _model([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])])
    rule = RewriteRule(
        "any-2d-transpose",
        lambda op, x: op.Transpose(x, perm=lambda perm: perm is not None and len(perm) == 2),
        lambda op, x: op.Transpose(x, perm=[1, 0]),
        condition=lambda match: True,
    )
    model = load_model(proto)
    assert apply_rules([model.graph], [rule], rounds=1) == {"any-2d-transpose": 1}


def test_several_spellings_in_one_rule():
    def mul_form(op, x):
        return op.Mul(x, op.Sigmoid(x))

    def div_form(op, x):
        return op.Div(x, op.Add(op.Exp(op.Neg(x)), 1.0))

    silu = RewriteRule("silu", [mul_form, div_form], lambda op, x: op.Silu(x, _domain="test"))
    proto = _model(
        [
            helper.make_node("Neg", ["x"], ["n"]),
            helper.make_node("Exp", ["n"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["d"]),
            helper.make_node("Div", ["x", "d"], ["y"]),
        ],
        initializers=[_scalar("one", 1.0)],
    )
    model = load_model(proto)
    assert apply_rules([model.graph], [silu]) == {"silu": 1}
    assert op_counts(model) == {"Silu": 1}
    assert model.graph.nodes[0].domain == "test"


def test_either_matches_an_optional_node():
    # Softmax(x [+ mask]): `op.either(f(x), x)` is an optional node.
    def softmax_with_optional_mask(op, x, mask):
        return op.Softmax(op.either(op.Add(x, mask), x), axis=-1)

    rule = RewriteRule(
        "tagged-softmax",
        softmax_with_optional_mask,
        lambda op, x, mask=None: op.Softmax(x if mask is None else op.Add(x, mask), axis=-1, _domain="test"),
    )
    masked = load_model(
        _model([helper.make_node("Add", ["x", "m"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)],
               initializers=[_scalar("m", 1.0)])
    )
    plain = load_model(_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)]))
    for model, expected in ((masked, {"Add": 1, "Softmax": 1}), (plain, {"Softmax": 1})):
        assert apply_rules([model.graph], [rule], rounds=1) == {"tagged-softmax": 1}
        assert op_counts(model) == expected
        assert [n.domain for n in model.graph.nodes if n.op == "Softmax"] == ["test"]


def _relu_of_sum(op, x, y):
    return op.Relu(op.Add(x, y, _name="total", _shared=True))


def _fused_relu_of_sum(op, x, y, match):
    total = op.Add(x, y)
    relu = op.Relu(total)
    return (relu, {"total": total}) if match.used_outside("total") else relu


def test_a_shared_inner_value_read_outside_gets_the_replacement_value():
    # Relu(x + x') where the sum also feeds a Neg: the rewrite may remove the old Add, since it says
    # which new value the Neg reads instead.
    proto = _model(
        [
            helper.make_node("Add", ["x", "x"], ["total"]),
            helper.make_node("Relu", ["total"], ["y"]),
            helper.make_node("Neg", ["total"], ["side"]),
        ],
        outputs=("y", "side", "total"),
    )
    rule = RewriteRule("relu-sum", _relu_of_sum, _fused_relu_of_sum)
    model = load_model(proto)
    assert apply_rules([model.graph], [rule], rounds=1) == {"relu-sum": 1}
    assert op_counts(model) == {"Add": 1, "Relu": 1, "Neg": 1}
    assert [t.name for t in model.graph.outputs] == ["y", "side", "total"]
    assert max_rel_error(proto, model) == 0


def test_a_shared_value_read_outside_without_a_replacement_declines():
    proto = _model(
        [
            helper.make_node("Add", ["x", "x"], ["total"]),
            helper.make_node("Relu", ["total"], ["y"]),
            helper.make_node("Neg", ["total"], ["side"]),
        ],
        outputs=("y", "side"),
    )
    rule = RewriteRule("relu-sum", _relu_of_sum, lambda op, x, y: op.Relu(op.Add(x, y)))
    model = load_model(proto)
    assert not apply_rules([model.graph], [rule])
    assert op_counts(model) == {"Add": 1, "Relu": 1, "Neg": 1}
