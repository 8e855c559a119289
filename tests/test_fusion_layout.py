"""simplify-layout: Transpose pairs merged, reshaping chains collapsed, Pad folded into Conv and pool pads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from graph_checks import apply, max_rel_error, op_counts
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxforge import optimize
from onnxforge.frontends.torch import from_torch

FLOAT = TensorProto.FLOAT


def _model(nodes, x_shape, initializers=(), opset=17, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, x_shape)],
        [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in dict(initializers).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _simplify(proto):
    model, result = apply("simplify-layout", proto)
    return model, result, max_rel_error(proto, model)


def _ints(*values):
    return np.array(values, np.int64)


# --- Transpose pairs --------------------------------------------------------------------------------------


def test_transposes_that_cancel_out_disappear():
    proto = _model(
        [
            helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", ["a"], ["b"], perm=[0, 3, 1, 2]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        [2, 3, 4, 5],
    )
    model, result, error = _simplify(proto)
    assert op_counts(model) == {"Relu": 1}
    assert result.stats == {"merge-transposes": 1}
    assert error == 0


@pytest.mark.parametrize(
    "first,second",
    [([0, 2, 1, 3], [1, 0, 2, 3]), ([3, 1, 0, 2], [2, 0, 3, 1]), (None, [0, 2, 1, 3]), ([1, 2, 3, 0], None)],
)
def test_two_transposes_become_one_with_the_composed_permutation(first, second):
    first_attrs = {} if first is None else {"perm": first}
    second_attrs = {} if second is None else {"perm": second}
    proto = _model(
        [
            helper.make_node("Transpose", ["x"], ["a"], **first_attrs),
            helper.make_node("Transpose", ["a"], ["y"], **second_attrs),
        ],
        [2, 3, 4, 5],
    )
    model, _, error = _simplify(proto)
    assert op_counts(model) == {"Transpose": 1}
    assert error == 0


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5).flatmap(lambda rank: st.tuples(st.permutations(range(rank)), st.permutations(range(rank)))))
def test_any_two_transposes_merge_into_their_composition(perms):
    first, second = perms
    proto = _model(
        [
            helper.make_node("Transpose", ["x"], ["a"], perm=list(first)),
            helper.make_node("Transpose", ["a"], ["y"], perm=list(second)),
        ],
        [2, 3, 4, 5, 6][: len(first)],
    )
    model, _, error = _simplify(proto)
    assert sum(op_counts(model).values()) == 1
    assert error == 0


def test_a_transpose_read_by_another_node_too_is_kept():
    proto = _model(
        [
            helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0]),
            helper.make_node("Transpose", ["a"], ["y"], perm=[1, 0]),
            helper.make_node("Relu", ["a"], ["r"]),
        ],
        [2, 3],
        outputs=("y", "r"),
    )
    _, result = apply("simplify-layout", proto)
    assert not result.changed


# --- Reshape, Flatten, Squeeze, Unsqueeze -------------------------------------------------------------------


def test_a_reshape_flatten_unsqueeze_chain_becomes_one_reshape():
    proto = _model(
        [
            helper.make_node("Reshape", ["x", "s"], ["a"]),
            helper.make_node("Flatten", ["a"], ["b"], axis=1),
            helper.make_node("Unsqueeze", ["b", "axes"], ["c"]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [2, 3, 4, 5],
        {"s": _ints(2, 3, 20), "axes": _ints(1)},
    )
    model, result, error = _simplify(proto)
    assert op_counts(model) == {"Reshape": 1, "Relu": 1}
    assert result.stats == {"collapse-reshapes": 2}
    (reshape,) = [n for n in model.graph.nodes if n.op == "Reshape"]
    assert reshape.inputs[1].values.tolist() == [2, 1, 60]
    assert error == 0


def _reshaping_chain(shape: list[int], steps: list[tuple[str, int]]) -> onnx.ModelProto:
    """x -> each step (Unsqueeze at, Flatten at, Squeeze all ones, Reshape to the reversed shape) -> Relu."""
    nodes, initializers, current, name = [], {}, list(shape), "x"
    for i, (kind, where) in enumerate(steps):
        inputs, attrs, axis = [name], {}, where % (len(current) + 1)
        if kind == "Unsqueeze":
            initializers[f"axes{i}"] = _ints(axis)
            inputs.append(f"axes{i}")
            current.insert(axis, 1)
        elif kind == "Flatten":
            attrs["axis"] = axis
            current = [int(np.prod(current[:axis])), int(np.prod(current[axis:]))]
        elif kind == "Squeeze":
            current = [d for d in current if d != 1]
        else:
            current = current[::-1]
            initializers[f"shape{i}"] = _ints(*current)
            inputs.append(f"shape{i}")
        nodes.append(helper.make_node(kind, inputs, [f"t{i}"], **attrs))
        name = f"t{i}"
    nodes.append(helper.make_node("Relu", [name], ["y"]))
    return _model(nodes, shape, initializers)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=4),
    st.lists(st.tuples(st.sampled_from(["Unsqueeze", "Flatten", "Squeeze", "Reshape"]), st.integers(0, 4)), min_size=2),
)
def test_any_static_reshaping_chain_becomes_at_most_one_op(shape, steps):
    proto = _reshaping_chain(shape, steps)
    model, _, error = _simplify(proto)
    counts = op_counts(model)
    assert counts["Relu"] == 1 and sum(counts.values()) <= 2
    assert error == 0


def test_squeeze_and_unsqueeze_with_axes_as_attributes_collapse():
    proto = _model(
        [
            helper.make_node("Squeeze", ["x"], ["a"], axes=[1]),
            helper.make_node("Unsqueeze", ["a"], ["y"], axes=[0, 3]),
        ],
        [2, 1, 4],
        opset=11,
    )
    model, _, error = _simplify(proto)
    assert op_counts(model) == {"Reshape": 1}
    assert error == 0


def test_an_unsqueeze_undone_by_a_squeeze_disappears():
    proto = _model(
        [
            helper.make_node("Unsqueeze", ["x", "axes"], ["a"]),
            helper.make_node("Squeeze", ["a", "axes"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        ["batch", 3],
        {"axes": _ints(1)},
    )
    model, _, error = _simplify(proto)
    assert op_counts(model) == {"Relu": 1}
    assert error == 0


def test_a_chain_over_a_symbolic_batch_reshapes_with_a_copied_dimension():
    proto = _model(
        [
            helper.make_node("Flatten", ["x"], ["a"], axis=1),
            helper.make_node("Unsqueeze", ["a", "axes"], ["y"]),
        ],
        ["batch", 3, 4],
        {"axes": _ints(1)},
    )
    model, _, error = _simplify(proto)
    assert op_counts(model) == {"Reshape": 1}
    assert model.graph.nodes[0].inputs[1].values.tolist() in ([0, 1, 12], [-1, 1, 12])
    assert error == 0


def test_a_chain_with_two_unknown_dimensions_is_kept():
    # [N, M, 4] -> [1, 1, N, M, 4]: N and M move, so neither can be copied, and only one may be -1.
    proto = _model(
        [
            helper.make_node("Unsqueeze", ["x", "axes"], ["a"]),
            helper.make_node("Unsqueeze", ["a", "axes"], ["y"]),
        ],
        ["n", "m", 4],
        {"axes": _ints(0)},
    )
    _, result = apply("simplify-layout", proto)
    assert not result.changed


@pytest.mark.parametrize(
    "x_shape,target", [([2, 3, 4], (2, 3, 4)), (["batch", 3, 4], (0, 3, 4)), (["batch", 3, 4], (-1, 3, 4))]
)
def test_a_reshape_to_the_shape_it_already_has_is_removed(x_shape, target):
    proto = _model(
        [helper.make_node("Reshape", ["x", "s"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        x_shape,
        {"s": _ints(*target)},
    )
    model, result, error = _simplify(proto)
    assert op_counts(model) == {"Relu": 1}
    assert result.stats == {"remove-reshape": 1}
    assert error == 0


@pytest.mark.parametrize("x_shape,target", [(["batch", 3, 4], (2, 3, 4)), (["batch", "seq"], (-1, -1))])
def test_a_reshape_that_may_change_a_dynamic_shape_is_kept(x_shape, target):
    proto = _model(
        [helper.make_node("Reshape", ["x", "s"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        x_shape,
        {"s": _ints(*target)},
    )
    _, result = apply("simplify-layout", proto)
    assert not result.changed


# --- Pad into Conv and pools --------------------------------------------------------------------------------

PADS = _ints(0, 0, 1, 2, 0, 0, 2, 1)  # begins of N, C, H, W, then ends


def _pad_then(consumer, amounts=PADS, value=None, mode="constant", opset=17, axes=None, **attrs):
    """x -> Pad -> consumer (Conv with a weight and bias, or a pool) -> Relu."""
    initializers = {"pads": amounts, "w": np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)}
    initializers["b"] = np.arange(4, dtype=np.float32)
    pad_inputs = ["x", "pads"]
    if value is not None:
        initializers["value"] = np.array(value, np.float32)
    if value is not None or axes is not None:
        pad_inputs.append("value" if value is not None else "")
    if axes is not None:
        initializers["axes"] = axes
        pad_inputs.append("axes")
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], mode=mode, pads=amounts.tolist(), value=value or 0.0)
        del initializers["pads"]
    else:
        pad = helper.make_node("Pad", pad_inputs, ["p"], mode=mode)
    inputs = ["p", "w", "b"] if consumer == "Conv" else ["p"]
    if consumer != "Conv":
        attrs.setdefault("kernel_shape", [3, 3])
        del initializers["w"], initializers["b"]
    nodes = [pad, helper.make_node(consumer, inputs, ["c"], **attrs), helper.make_node("Relu", ["c"], ["y"])]
    return _model(nodes, [2, 3, 6, 7], initializers, opset=opset)


@pytest.mark.parametrize("opset", [10, 17, 18])
@pytest.mark.parametrize("conv_pads", [None, [1, 0, 0, 1]])
def test_zero_pad_folds_into_conv_pads(opset, conv_pads):
    attrs = {} if conv_pads is None else {"pads": conv_pads}
    proto = _pad_then("Conv", opset=opset, **attrs)
    model, result, error = _simplify(proto)
    assert op_counts(model) == {"Conv": 1, "Relu": 1}
    assert result.stats == {"fold-pad": 1}
    (conv,) = [n for n in model.graph.nodes if n.op == "Conv"]
    assert conv.attrs["pads"] == ([1, 2, 2, 1] if conv_pads is None else [2, 2, 2, 2])
    assert error < 1e-6


def test_pad_with_axes_folds_into_conv():
    proto = _pad_then("Conv", amounts=_ints(1, 2, 2, 1), axes=_ints(-2, 3), opset=18, strides=[2, 2])
    model, _, error = _simplify(proto)
    assert op_counts(model) == {"Conv": 1, "Relu": 1}
    assert error < 1e-6


def test_zero_pad_folds_into_conv_with_auto_pad_valid():
    model, _, error = _simplify(_pad_then("Conv", auto_pad="VALID"))
    assert op_counts(model) == {"Conv": 1, "Relu": 1}
    assert error < 1e-6


@pytest.mark.parametrize(
    "case",
    [
        dict(value=0.5),
        dict(mode="reflect"),
        dict(amounts=_ints(0, 1, 1, 1, 0, 0, 1, 1)),  # pads channels
        dict(amounts=_ints(0, 0, 1, -1, 0, 0, 1, 1)),  # crops
        dict(auto_pad="SAME_UPPER"),
    ],
    ids=["nonzero-value", "reflect", "channel-pads", "negative-pads", "auto-pad-same"],
)
def test_pad_that_conv_padding_cannot_express_is_kept(case):
    proto = _pad_then("Conv", **case)
    _, result = apply("simplify-layout", proto)
    assert not result.changed


def test_zero_pad_folds_into_average_pool_that_counts_padding():
    proto = _pad_then("AveragePool", count_include_pad=1)
    model, _, error = _simplify(proto)
    assert op_counts(model) == {"AveragePool": 1, "Relu": 1}
    assert error < 1e-6


@pytest.mark.parametrize(
    "attrs",
    [dict(count_include_pad=0), dict(count_include_pad=1, ceil_mode=1), dict(count_include_pad=1, kernel_shape=[2, 2])],
    ids=["padding-not-counted", "ceil-mode", "pad-not-smaller-than-kernel"],
)
def test_pad_before_average_pool_is_kept_where_not_equivalent(attrs):
    _, result = apply("simplify-layout", _pad_then("AveragePool", **attrs))
    assert not result.changed


def test_minus_infinity_pad_folds_into_max_pool():
    model, _, error = _simplify(_pad_then("MaxPool", value=-np.inf, strides=[2, 2]))
    assert op_counts(model) == {"MaxPool": 1, "Relu": 1}
    assert error == 0


@pytest.mark.parametrize("value", [None, 0.0, -1e30])
def test_pad_with_a_finite_value_before_max_pool_is_kept(value):
    # Max over a window holding the padded zero is not the max over the real values when those are negative.
    _, result = apply("simplify-layout", _pad_then("MaxPool", value=value))
    assert not result.changed


def test_simplify_layout_in_the_pipeline_is_verified_and_applied():
    model, report = optimize(_pad_then("Conv"), "cleanup,simplify-layout", seed=0)
    assert [(p.name, p.status) for p in report.passes] == [("cleanup", "unchanged"), ("simplify-layout", "applied")]
    assert op_counts(model) == {"Conv": 1, "Relu": 1}


# --- PyTorch exports ----------------------------------------------------------------------------------------


class Layouts(nn.Module):
    """permute().permute() pairs, view/flatten/unsqueeze chains, ZeroPad2d before a Conv, F.pad before pools."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        back = x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        swapped = x.permute(0, 2, 1, 3).permute(1, 0, 2, 3)
        flat = torch.flatten(x.view(x.shape[0], 3, 20), 1).unsqueeze(1)
        y = self.conv(self.pad(x + back))
        pooled = F.max_pool2d(F.pad(y, (1, 1, 1, 1), value=-float("inf")), 3)
        averaged = F.avg_pool2d(F.pad(y, (1, 1, 1, 1)), 3, count_include_pad=True)
        return swapped * 2, flat.relu(), pooled, averaged


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_torch_layout_chains_and_pads_are_simplified(dynamic_batch):
    torch.manual_seed(0)
    outputs = ["swapped", "flat", "pooled", "averaged"]
    dynamic = {"x": {0: "batch"}} if dynamic_batch else None
    model = from_torch(Layouts(), torch.randn(2, 3, 4, 5), ["x"], outputs, dynamic_axes=dynamic)
    before = op_counts(optimize(model, "cleanup", seed=0)[0])
    # The exporter merges consecutive transposes itself (and drops the identity pair).
    assert before["Transpose"] == 1
    assert (before["Reshape"], before["Flatten"], before["Unsqueeze"] >= 1, before["Pad"]) == (1, 1, True, 3)

    optimized, report = optimize(model, "cleanup,fuse,cleanup", seed=0)
    assert report.passes[1].status == "applied", report.passes[1].error
    assert report.passes[1].stats["fold-pad"] == 3
    assert report.passes[1].stats["collapse-reshapes"] == 2
    after = op_counts(optimized)
    assert (after["Pad"], after["Flatten"], after["Unsqueeze"], after["Reshape"], after["Transpose"]) == (0, 0, 0, 1, 1)
    assert max_rel_error(model, optimized) < 1e-5
