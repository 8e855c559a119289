"""fold-batchnorm and fold-scale-into-conv: per-channel affine ops folded into the weights before them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from graph_checks import apply, max_rel_error, op_counts
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxforge import optimize
from onnxforge.frontends.torch import from_torch

FLOAT = TensorProto.FLOAT
RTOL = 1e-5


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _weights(seed=0, **arrays_or_shapes):
    """Initializers: a shape gives random float32 values, an array is taken as is."""
    rng = np.random.default_rng(seed)
    return [
        numpy_helper.from_array(
            value if isinstance(value, np.ndarray) else rng.standard_normal(value).astype(np.float32), name
        )
        for name, value in arrays_or_shapes.items()
    ]


def _bn_stats(channels, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return _weights(
        scale=rng.uniform(0.5, 2.0, channels).astype(dtype),
        shift=rng.standard_normal(channels).astype(dtype),
        mean=rng.standard_normal(channels).astype(dtype),
        var=rng.uniform(0.2, 3.0, channels).astype(dtype),
    )


def _bn(source="y", output="z", **attrs):
    return helper.make_node("BatchNormalization", [source, "scale", "shift", "mean", "var"], [output], **attrs)


def _fold(proto, pass_name="fold-batchnorm"):
    model, result = apply(pass_name, proto)
    return model, result, max_rel_error(proto, model)


# --- BatchNormalization into Conv and ConvTranspose -------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group", [1, 2])
def test_bn_folds_into_conv(with_bias, group):
    inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    proto = _model(
        [helper.make_node("Conv", inputs, ["y"], pads=[1, 1, 1, 1], group=group), _bn(epsilon=1e-3)],
        [_vi("x", [2, 4, 6, 6])],
        [_vi("z", None)],
        _weights(w=(6, 4 // group, 3, 3), b=(6,)) + _bn_stats(6),
    )
    model, result, error = _fold(proto)
    assert op_counts(model) == {"Conv": 1}
    assert len(model.graph.nodes[0].inputs) == 3
    assert result.stats == {"fold-batchnorm": 1}
    assert error < RTOL


def test_bn_folds_into_conv1d_from_batchnorm_over_3d_input():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [2, 3, 10])],
        [_vi("z", None)],
        _weights(w=(5, 3, 3)) + _bn_stats(5),
    )
    model, _, error = _fold(proto)
    assert op_counts(model) == {"Conv": 1}
    assert error < RTOL


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group", [1, 2])
def test_bn_folds_into_conv_transpose_whose_weight_has_output_channels_on_axis_1(with_bias, group):
    # Weight [C_in=4, C_out/group=3, 3, 3]: 3 * group output channels.
    inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    proto = _model(
        [helper.make_node("ConvTranspose", inputs, ["y"], strides=[2, 2], group=group), _bn()],
        [_vi("x", [2, 4, 5, 5])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3), b=(3 * group,)) + _bn_stats(3 * group),
    )
    model, _, error = _fold(proto)
    assert op_counts(model) == {"ConvTranspose": 1}
    assert error < RTOL


def test_bn_is_kept_when_the_conv_output_has_another_consumer():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn(), helper.make_node("Relu", ["y"], ["r"])],
        [_vi("x", [1, 3, 5, 5])],
        [_vi("z", None), _vi("r", None)],
        _weights(w=(4, 3, 3, 3)) + _bn_stats(4),
    )
    model, result, _ = _fold(proto)
    assert not result.changed
    assert op_counts(model) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}


def test_bn_is_kept_when_the_conv_output_is_a_graph_output():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [1, 3, 5, 5])],
        [_vi("z", None), _vi("y", None)],
        _weights(w=(4, 3, 3, 3)) + _bn_stats(4),
    )
    _, result, _ = _fold(proto)
    assert not result.changed


def test_bn_in_training_mode_is_kept():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn(training_mode=1)],
        [_vi("x", [1, 3, 5, 5])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3)) + _bn_stats(4),
    )
    _, result = apply("fold-batchnorm", proto)
    assert not result.changed
    assert result.notes == [
        "fold-batchnorm declined at 1 place (BatchNormalization): the BatchNormalization is in training mode"
    ]


def test_bn_after_a_conv_whose_weight_is_computed_is_kept_and_says_why():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [1, 3, 5, 5]), _vi("w", [4, 3, 3, 3])],
        [_vi("z", None)],
        _bn_stats(4),
    )
    _, result = apply("fold-batchnorm", proto)
    assert not result.changed
    assert result.notes == [
        "fold-batchnorm declined at 1 place (BatchNormalization): the Conv's weight or bias is not a constant"
    ]


def test_bn_with_running_statistics_outputs_is_kept_since_before_opset_14_that_means_training():
    statistics = ["new_mean", "new_var", "saved_mean", "saved_var"]
    bn = helper.make_node("BatchNormalization", ["y", "scale", "shift", "mean", "var"], ["z", *statistics])
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn],
        [_vi("x", [1, 3, 5, 5])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3)) + _bn_stats(4),
        opset=9,
    )
    _, result = apply("fold-batchnorm", proto)
    assert not result.changed


def test_bn_folds_at_opset_9():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [1, 3, 5, 5])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3)) + _bn_stats(4),
        opset=9,
    )
    model, _, error = _fold(proto)
    assert op_counts(model) == {"Conv": 1}
    assert error < RTOL


def test_bn_with_statistics_from_a_graph_input_is_kept():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [1, 3, 5, 5]), _vi("mean", [4])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3)) + [t for t in _bn_stats(4) if t.name != "mean"],
    )
    _, result = apply("fold-batchnorm", proto)
    assert not result.changed
    assert result.notes[0].endswith(": the BatchNormalization's scale, bias, mean or variance is not a constant")


def test_bn_whose_scale_is_infinite_is_kept():
    stats = [t for t in _bn_stats(4) if t.name != "var"] + _weights(var=np.zeros(4, np.float32))
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn(epsilon=0.0)],
        [_vi("x", [1, 3, 5, 5])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3)) + stats,
    )
    _, result = apply("fold-batchnorm", proto)
    assert not result.changed
    assert result.notes[0].endswith(": the variance plus epsilon is not positive in every channel")


def test_bn_in_double_precision_is_kept():
    stats = _bn_stats(4, dtype=np.float64)
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [1, 3, 5, 5], TensorProto.DOUBLE)],
        [_vi("z", None, TensorProto.DOUBLE)],
        _weights(w=np.ones((4, 3, 3, 3))) + stats,
    )
    _, result = apply("fold-batchnorm", proto)
    assert not result.changed


# --- BatchNormalization into Gemm and MatMul --------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (6,), (1, 6), (4, 6), ()])
def test_bn_folds_into_gemm_respecting_trans_b_alpha_beta_and_bias_shape(trans_b, bias_shape):
    inputs = ["x", "w"] if bias_shape is None else ["x", "w", "c"]
    proto = _model(
        [helper.make_node("Gemm", inputs, ["y"], transB=trans_b, alpha=0.7, beta=1.5), _bn()],
        [_vi("x", [4, 5])],
        [_vi("z", None)],
        _weights(w=(6, 5) if trans_b else (5, 6), c=bias_shape or (1,)) + _bn_stats(6),
    )
    model, _, error = _fold(proto)
    assert op_counts(model) == {"Gemm": 1}
    assert error < RTOL


def test_bn_after_a_2d_matmul_becomes_one_gemm():
    proto = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [4, 5])],
        [_vi("z", None)],
        _weights(w=(5, 6)) + _bn_stats(6),
    )
    model, _, error = _fold(proto)
    assert op_counts(model) == {"Gemm": 1}
    assert error < RTOL


def test_bn_after_a_3d_matmul_is_kept_since_its_channels_are_not_the_matmul_columns():
    # [2, 6, 5] @ [5, 6] -> [2, 6, 6]: BN normalizes axis 1 (6 rows), not the 6 columns the weight makes.
    proto = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), _bn()],
        [_vi("x", [2, 6, 5])],
        [_vi("z", None)],
        _weights(w=(5, 6)) + _bn_stats(6),
    )
    _, result = apply("fold-batchnorm", proto)
    assert not result.changed


def test_fold_batchnorm_in_the_pipeline_is_verified_and_applied():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), _bn(), helper.make_node("Relu", ["z"], ["out"])],
        [_vi("x", [1, 3, 8, 8])],
        [_vi("out", None)],
        _weights(w=(4, 3, 3, 3)) + _bn_stats(4),
    )
    model, report = optimize(proto, "cleanup,fold-batchnorm", seed=0)
    assert [(p.name, p.status) for p in report.passes] == [("cleanup", "unchanged"), ("fold-batchnorm", "applied")]
    assert op_counts(model) == {"Conv": 1, "Relu": 1}


# --- Mul and Add by constants -----------------------------------------------------------------------------


def _conv_then(follower, constant_shape, with_bias=True, seed=3):
    inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    rng = np.random.default_rng(seed)
    return _model(
        [helper.make_node("Conv", inputs, ["y"]), helper.make_node(follower, ["y", "c"], ["z"])],
        [_vi("x", [2, 3, 6, 6])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3), b=(4,), c=rng.uniform(0.5, 2.0, constant_shape).astype(np.float32)),
    )


@pytest.mark.parametrize("follower", ["Mul", "Add"])
@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_per_channel_mul_and_add_fold_into_conv(follower, shape, with_bias):
    proto = _conv_then(follower, shape, with_bias)
    model, result, error = _fold(proto, "fold-scale-into-conv")
    assert op_counts(model) == {"Conv": 1}
    assert result.stats == {f"fold-{follower.lower()}": 1}
    assert error < RTOL


@pytest.mark.parametrize("follower", ["Mul", "Add"])
@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (4, 4, 4), (1, 1, 4, 1, 1), (2, 4, 1, 1)])
def test_mul_and_add_varying_along_other_axes_are_kept(follower, shape):
    # Spatial or batch variation, or a constant that adds an axis: not one value per output channel.
    proto = _conv_then(follower, shape)
    _, result = apply("fold-scale-into-conv", proto)
    assert not result.changed


def test_mul_folds_into_conv_transpose_with_groups():
    proto = _model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=2), helper.make_node("Mul", ["c", "y"], ["z"])],
        [_vi("x", [2, 4, 5, 5])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3), c=(6, 1, 1)),
    )
    model, _, error = _fold(proto, "fold-scale-into-conv")
    assert op_counts(model) == {"ConvTranspose": 1}
    assert error < RTOL


@pytest.mark.parametrize("follower", ["Mul", "Add"])
@pytest.mark.parametrize("shape", [(6,), (1, 6), ()])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_per_column_mul_and_add_fold_into_gemm(follower, shape, trans_b):
    proto = _model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b, alpha=0.5, beta=2.0),
            helper.make_node(follower, ["y", "c"], ["z"]),
        ],
        [_vi("x", [4, 5])],
        [_vi("z", None)],
        _weights(w=(6, 5) if trans_b else (5, 6), b=(6,), c=shape),
    )
    model, _, error = _fold(proto, "fold-scale-into-conv")
    assert op_counts(model) == {"Gemm": 1}
    assert error < RTOL


def test_mul_varying_per_row_of_a_gemm_is_kept():
    proto = _model(
        [helper.make_node("Gemm", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "c"], ["z"])],
        [_vi("x", [4, 5])],
        [_vi("z", None)],
        _weights(w=(5, 6), c=(4, 1)),
    )
    _, result = apply("fold-scale-into-conv", proto)
    assert not result.changed


def test_mul_by_infinity_is_kept():
    # Conv output 0 times inf is NaN; an infinite weight would give NaN or inf elsewhere too.
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "c"], ["z"])],
        [_vi("x", [1, 3, 5, 5])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3), c=np.array([1.0, np.inf, 1.0, 1.0], np.float32).reshape(4, 1, 1)),
    )
    _, result = apply("fold-scale-into-conv", proto)
    assert not result.changed


def test_mul_by_a_graph_input_is_kept():
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "c"], ["z"])],
        [_vi("x", [1, 3, 5, 5]), _vi("c", [4, 1, 1])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3)),
    )
    _, result = apply("fold-scale-into-conv", proto)
    assert not result.changed


def test_a_conv_add_mul_chain_folds_completely_in_the_pipeline():
    proto = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["y"]),
            helper.make_node("Add", ["y", "a"], ["t"]),
            helper.make_node("Mul", ["t", "m"], ["z"]),
        ],
        [_vi("x", [1, 3, 8, 8])],
        [_vi("z", None)],
        _weights(w=(4, 3, 3, 3), a=(1, 4, 1, 1), m=(4, 1, 1)),
    )
    model, report = optimize(proto, "cleanup,fold-scale-into-conv", seed=0)
    assert report.passes[-1].status == "applied"
    assert op_counts(model) == {"Conv": 1}


# --- PyTorch exports ----------------------------------------------------------------------------------------


def _seeded(module: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that folding them is really checked."""
    torch.manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(layer.weight, 0.5, 1.5)
            nn.init.uniform_(layer.bias, -0.5, 0.5)
    return module.eval()


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)


class ConvTransposeBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.ReLU())

    def forward(self, x):
        return self.body(x)


class LinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))

    def forward(self, x):
        return self.body(x)


TORCH_CASES = {
    "conv_bn_relu": (ConvBnRelu, (2, 3, 8, 8), Counter({"Conv": 2, "Relu": 2})),
    "conv_transpose_bn": (ConvTransposeBn, (2, 4, 5, 5), Counter({"ConvTranspose": 1, "Relu": 1})),
    "linear_bn1d": (LinearBn, (4, 5), Counter({"Gemm": 2, "Relu": 1})),
}


def _export(name, constant_folding):
    build, shape, _ = TORCH_CASES[name]
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return from_torch(_seeded(build()), example, ["x"], ["y"], do_constant_folding=constant_folding)


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_torch_export_without_constant_folding_keeps_bn_and_fuse_folds_it(name):
    model = _export(name, constant_folding=False)
    assert op_counts(model)["BatchNormalization"] >= 1
    optimized, report = optimize(model, "cleanup,fuse", seed=0)
    assert report.passes[-1].status == "applied", report.passes[-1].error
    assert report.passes[-1].stats["fold-batchnorm"] == op_counts(model)["BatchNormalization"]
    assert op_counts(optimized) == TORCH_CASES[name][2]
    assert max_rel_error(model, optimized) < 1e-4


def test_torch_export_with_constant_folding_already_folds_bn_into_conv_only():
    # The legacy exporter folds BatchNorm2d into a preceding Conv itself, not into ConvTranspose or Linear.
    assert op_counts(_export("conv_bn_relu", constant_folding=True))["BatchNormalization"] == 0
    for name in ("conv_transpose_bn", "linear_bn1d"):
        model = _export(name, constant_folding=True)
        assert op_counts(model)["BatchNormalization"] == 1
        optimized, report = optimize(model, "cleanup,fuse", seed=0)
        assert report.passes[-1].status == "applied", report.passes[-1].error
        assert op_counts(optimized) == TORCH_CASES[name][2]
        assert max_rel_error(model, optimized) < 1e-4
