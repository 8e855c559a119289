"""fuse-matmul-add: MatMul by a constant weight plus a constant bias becomes Gemm, for 2-D inputs only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graph_checks import apply, max_rel_error, op_counts
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxforge import optimize
from onnxforge.frontends.torch import from_torch

FLOAT = TensorProto.FLOAT


def _matmul_add(x_shape, bias_shape=(6,), bias_first=False, extra_nodes=(), outputs=("y",), bias_input=False):
    """x @ w (w constant [5, 6]) + b, the bias a constant of `bias_shape` or a graph input."""
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "w")]
    inputs = [helper.make_tensor_value_info("x", FLOAT, x_shape)]
    if bias_input:
        inputs.append(helper.make_tensor_value_info("b", FLOAT, bias_shape))
    else:
        initializers.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "b"))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["b", "m"] if bias_first else ["m", "b"], ["y"]),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs], initializers
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (), (1,), (1, 1)])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_on_a_2d_input_becomes_gemm(bias_shape, bias_first):
    proto = _matmul_add([4, 5], bias_shape, bias_first)
    model, result = apply("fuse-matmul-add", proto)
    assert op_counts(model) == {"Gemm": 1}
    assert result.stats == {"fuse-matmul-add": 1}
    assert max_rel_error(proto, model) < 1e-5


def test_matmul_add_with_a_symbolic_batch_becomes_gemm():
    proto = _matmul_add(["batch", 5])
    model, _ = apply("fuse-matmul-add", proto)
    assert op_counts(model) == {"Gemm": 1}
    assert max_rel_error(proto, model) < 1e-5


@pytest.mark.parametrize("x_shape", [[2, 3, 5], ["batch", "seq", 5], [5], None])
def test_matmul_add_on_an_input_not_known_to_be_2d_stays(x_shape):
    # On [batch, seq, hidden] (transformers) a Gemm would need reshapes around it.
    proto = _matmul_add(x_shape)
    model, result = apply("fuse-matmul-add", proto)
    assert not result.changed
    assert op_counts(model) == {"MatMul": 1, "Add": 1}


def test_a_bias_that_varies_per_row_stays():
    proto = _matmul_add([4, 5], bias_shape=(4, 6))
    _, result = apply("fuse-matmul-add", proto)
    assert not result.changed


def test_a_bias_that_adds_an_axis_stays():
    proto = _matmul_add([4, 5], bias_shape=(1, 1, 6))
    _, result = apply("fuse-matmul-add", proto)
    assert not result.changed


def test_a_bias_from_a_graph_input_stays():
    proto = _matmul_add([4, 5], bias_input=True)
    _, result = apply("fuse-matmul-add", proto)
    assert not result.changed


def test_a_matmul_whose_output_is_also_read_elsewhere_stays():
    proto = _matmul_add([4, 5], extra_nodes=[helper.make_node("Relu", ["m"], ["r"])], outputs=("y", "r"))
    _, result = apply("fuse-matmul-add", proto)
    assert not result.changed


def test_fuse_matmul_add_in_the_pipeline_is_verified_and_applied():
    proto = _matmul_add([4, 5], extra_nodes=[helper.make_node("Relu", ["y"], ["r"])], outputs=("r",))
    model, report = optimize(proto, "cleanup,fuse-matmul-add", seed=0)
    assert report.passes[-1].name == "fuse-matmul-add" and report.passes[-1].status == "applied"
    assert op_counts(model) == {"Gemm": 1, "Relu": 1}


class MatMulPlusBias(nn.Module):
    """x @ W + b written by hand, then a Linear on [batch, seq, hidden]."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))
        self.bias = nn.Parameter(torch.randn(6))
        self.seq = nn.Linear(6, 4)

    def forward(self, x):
        hidden = torch.relu(x @ self.weight + self.bias)
        return self.seq(hidden.unsqueeze(1).expand(-1, 3, -1))


def test_torch_2d_matmul_plus_bias_becomes_gemm_and_the_3d_linear_stays_matmul():
    torch.manual_seed(0)
    model = from_torch(MatMulPlusBias(), torch.randn(4, 5), ["x"], ["y"])
    assert op_counts(model)["MatMul"] == 2
    optimized, report = optimize(model, "cleanup,fuse", seed=0)
    assert report.passes[-1].status == "applied", report.passes[-1].error
    assert report.passes[-1].stats["fuse-matmul-add"] == 1
    counts = op_counts(optimized)
    assert counts["Gemm"] == 1 and counts["MatMul"] == 1
    assert max_rel_error(model, optimized) < 1e-4
