"""fuse-normalization: decomposed LayerNorm and RMSNorm become LayerNormalization and RMSNormalization."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from graph_checks import apply, max_rel_error, op_counts
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnxforge
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import Model
from onnxforge.pipeline import PassContext, create_passes

DECOMPOSED_LAYER_NORM = {"ReduceMean": 2, "Sub": 1, "Pow": 1, "Add": 2, "Sqrt": 1, "Div": 1, "Mul": 1}


class LayerNorm(nn.Module):
    """LayerNorm written out, as in BERT ports; `dims` are the averaged trailing dims."""

    def __init__(self, shape=(16,), dims=(-1,), affine=True):
        super().__init__()
        self.dims, self.affine = dims, affine
        self.weight = nn.Parameter(torch.rand(shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(self.dims, keepdim=True)
        y = (x - u) / torch.sqrt((x - u).pow(2).mean(self.dims, keepdim=True) + 1e-5)
        return self.weight * y + self.bias if self.affine else y


class LlamaRMSNorm(nn.Module):
    """LLaMA's RMSNorm: statistics in float32, rsqrt, the weight applied after casting back."""

    def __init__(self, width: int = 16, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _exported(module: nn.Module, opset: int) -> Model:
    """The module exported from PyTorch and cleaned up (constants folded into initializers)."""
    torch.manual_seed(0)
    model = from_torch(module.eval(), torch.randn(2, 5, 16), ["x"], ["y"], opset=opset)
    (cleanup,) = create_passes("cleanup")
    cleanup.run(model, PassContext())
    return model


def _fused(model: Model | onnx.ModelProto, backend: str = "ort") -> tuple[Model, dict]:
    """A fused copy of the model, and the pass's counters."""
    fused, result = apply("fuse-normalization", model, backend)
    return fused, result.stats


def _error(before: Model | onnx.ModelProto, after: Model) -> float:
    # LayerNormalization computes the variance as E[x^2] - E[x]^2: it differs from the decomposed form by
    # about 1e-7 relative on these inputs, well inside the pass manager's 1e-4.
    return max_rel_error(before, after, graph_optimization="disable")


def _norm_graph(nodes, initializers, opset, shape=(2, 5, 16)) -> onnx.ModelProto:
    """A graph of `nodes` from x to y, with the constants `initializers` (name: value) as float32
    (names ending in _axes as int64)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [
            numpy_helper.from_array(np.asarray(v, np.int64 if name.endswith("_axes") else np.float32), name)
            for name, v in initializers.items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _reduce_mean(source, target, axes, opset):
    if opset >= 18:
        return helper.make_node("ReduceMean", [source, f"{target}_axes"], [target])
    return helper.make_node("ReduceMean", [source], [target], axes=axes)


def _layer_norm_graph(opset=17, axes=(-1,), square="Pow", gamma=None, beta=None, variance_axes=None, shape=(2, 5, 16)):
    """(x - mean) / sqrt(var + 1e-5) [* gamma] [+ beta] over `axes`, built with onnx.helper."""
    variance_axes = variance_axes or axes
    squared = (
        helper.make_node("Pow", ["d", "two"], ["p"]) if square == "Pow" else helper.make_node("Mul", ["d", "d"], ["p"])
    )
    nodes = [
        _reduce_mean("x", "m", list(axes), opset),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        squared,
        _reduce_mean("p", "v", list(variance_axes), opset),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n" if gamma is not None else "y"]),
    ]
    constants = {"two": 2.0, "eps": 1e-5, "m_axes": list(axes), "v_axes": list(variance_axes)}
    if gamma is not None:
        nodes.append(helper.make_node("Mul", ["gamma", "n"], ["g" if beta is not None else "y"]))
        constants["gamma"] = gamma
    if beta is not None:
        nodes.append(helper.make_node("Add", ["g", "beta"], ["y"]))
        constants["beta"] = beta
    return _norm_graph(nodes, constants, opset, shape)


def _rms_norm_graph(opset=23, axes=(-1,), square="Pow", divide="Div", gamma=None):
    """x / sqrt(mean(x^2) + 1e-6) [* gamma], with the division spelled `divide`."""
    squared = (
        helper.make_node("Pow", ["x", "two"], ["p"]) if square == "Pow" else helper.make_node("Mul", ["x", "x"], ["p"])
    )
    out = "n" if gamma is not None else "y"
    division = {
        "Div": [helper.make_node("Div", ["x", "s"], [out])],
        "Reciprocal": [helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["r", "x"], [out])],
        "rsqrt": [helper.make_node("Div", ["one", "s"], ["r"]), helper.make_node("Mul", ["x", "r"], [out])],
    }[divide]
    nodes = [
        squared,
        _reduce_mean("p", "v", list(axes), opset),
        helper.make_node("Add", ["eps", "v"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        *division,
    ]
    constants = {"two": 2.0, "one": 1.0, "eps": 1e-6, "v_axes": list(axes)}
    if gamma is not None:
        nodes.append(helper.make_node("Mul", ["n", "gamma"], ["y"]))
        constants["gamma"] = gamma
    return _norm_graph(nodes, constants, opset)


GAMMA = np.linspace(0.5, 1.5, 16)
BETA = np.linspace(-1.0, 1.0, 16)


# --- LayerNorm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [17, 18, 20])
def test_hand_written_layer_norm_fuses_with_gamma_and_beta(opset):
    model = _exported(LayerNorm(), opset)  # axes as an attribute before opset 18, as an input from 18
    assert op_counts(model) == DECOMPOSED_LAYER_NORM
    fused, stats = _fused(model)
    assert stats == {"layer-norm": 1, "normalization-scale": 1, "normalization-bias": 1}
    assert op_counts(fused) == {"LayerNormalization": 1}
    (node,) = fused.graph.nodes
    assert node.attrs["axis"] == -1 and node.attrs["epsilon"] == pytest.approx(1e-5)
    assert _error(model, fused) < 1e-4


@pytest.mark.parametrize("opset", [13, 14, 15, 16])
def test_nn_layer_norm_exported_below_opset_17_is_recognized_once_the_opset_allows(opset):
    # torch exports nn.LayerNorm decomposed below opset 17. There it is left alone, for onnxruntime too:
    # its LayerNormalization kernel is registered in the ONNX domain, which onnx.checker refuses below 17.
    model = _exported(nn.LayerNorm(16), opset)
    assert op_counts(model) == DECOMPOSED_LAYER_NORM
    for backend in ("ort", "tvm"):
        unchanged, stats = _fused(model, backend)
        assert not stats and op_counts(unchanged) == DECOMPOSED_LAYER_NORM
    converted, _ = apply("upgrade-opset:to=17", model)  # optimize --passes upgrade-opset:to=17,cleanup,fuse
    fused, stats = _fused(converted)
    assert stats == {"layer-norm": 1, "normalization-scale": 1, "normalization-bias": 1}
    assert op_counts(fused) == {"LayerNormalization": 1}
    assert _error(model, fused) < 1e-4


def test_layer_norm_with_mul_instead_of_pow_and_without_gamma_or_beta_fuses():
    proto = _layer_norm_graph(square="Mul")
    fused, stats = _fused(proto, backend="tvm")
    assert stats == {"layer-norm": 1}
    assert op_counts(fused) == {"LayerNormalization": 1}
    assert _error(proto, fused) < 1e-4


def test_layer_norm_with_gamma_only_folds_it_into_the_scale():
    proto = _layer_norm_graph(opset=18, gamma=GAMMA)
    fused, stats = _fused(proto)
    assert stats == {"layer-norm": 1, "normalization-scale": 1}
    (node,) = fused.graph.nodes
    assert node.op == "LayerNormalization" and len(node.inputs) == 2
    np.testing.assert_allclose(node.inputs[1].values, GAMMA.astype(np.float32))
    assert _error(proto, fused) < 1e-4


def test_layer_norm_over_the_last_two_axes_fuses_with_a_broadcast_gamma():
    model = _exported(LayerNorm(shape=(16,), dims=(-2, -1)), opset=18)
    fused, stats = _fused(model)
    assert stats == {"layer-norm": 1, "normalization-scale": 1, "normalization-bias": 1}
    (node,) = fused.graph.nodes
    assert node.attrs["axis"] == -2
    assert [tuple(t.shape) for t in node.inputs[1:]] == [(5, 16), (5, 16)]
    assert _error(model, fused) < 1e-4


def test_layer_norm_with_positive_axes_naming_the_last_one_fuses():
    proto = _layer_norm_graph(axes=(2,), gamma=GAMMA, beta=BETA)
    fused, _ = _fused(proto)
    assert op_counts(fused) == {"LayerNormalization": 1}
    assert _error(proto, fused) < 1e-4


def test_layer_norm_over_an_axis_that_is_not_last_is_left_alone():
    proto = _layer_norm_graph(axes=(1,))
    _, result = apply("fuse-normalization", proto)
    assert not result.stats
    reason = "the means are not all over the same trailing axes of x, of constant sizes"
    assert f"layer-norm declined at 1 place (Div): {reason}" in result.notes


def test_layer_norm_whose_mean_and_variance_average_different_axes_is_left_alone():
    proto = _layer_norm_graph(axes=(-1,), variance_axes=(-2, -1))
    _, stats = _fused(proto)
    assert not stats


def test_gamma_that_varies_along_the_batch_is_not_folded():
    gamma = np.linspace(0.5, 1.5, 2 * 16).reshape(2, 1, 16)
    proto = _layer_norm_graph(gamma=gamma, beta=BETA)
    fused, stats = _fused(proto)
    assert stats == {"layer-norm": 1}
    assert op_counts(fused) == {"LayerNormalization": 1, "Mul": 1, "Add": 1}
    assert _error(proto, fused) < 1e-4


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([1, 2]), st.lists(st.booleans(), min_size=0, max_size=3), st.booleans())
def test_gamma_and_beta_fold_exactly_when_they_vary_along_normalized_dims_only(normalized, full_dims, with_beta):
    # gamma's trailing dims are each 1 or the size of x's dim there; the leading dims of x it does not have
    # broadcast. It may fold only when it is constant along every dim that is not normalized.
    x_shape = (2, 5, 16)
    shape = tuple(x_shape[3 - len(full_dims) + i] if full else 1 for i, full in enumerate(full_dims))
    gamma = np.linspace(0.5, 1.5, int(np.prod(shape, dtype=int))).reshape(shape)
    proto = _layer_norm_graph(
        axes=tuple(range(-normalized, 0)), gamma=gamma, beta=gamma - 1.0 if with_beta else None
    )
    fused, stats = _fused(proto)
    foldable = all(d == 1 for d in ((1,) * (3 - len(shape)) + shape)[: 3 - normalized])
    assert stats.get("normalization-scale", 0) == int(foldable)
    left = Counter() if foldable else Counter(Mul=1, Add=int(with_beta))
    assert op_counts(fused) == Counter(LayerNormalization=1) + left
    assert _error(proto, fused) < 1e-4


def test_gamma_that_would_widen_the_output_is_not_folded():
    gamma = np.linspace(0.5, 1.5, 3 * 16).reshape(3, 1, 1, 16)  # [3, 2, 5, 16] after broadcasting
    proto = _layer_norm_graph(gamma=gamma)
    proto.graph.output[0].type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=3))
    fused, stats = _fused(proto)
    assert stats == {"layer-norm": 1}
    assert op_counts(fused) == {"LayerNormalization": 1, "Mul": 1}
    assert _error(proto, fused) < 1e-4


# --- RMSNorm --------------------------------------------------------------------------------------------


def test_llama_rms_norm_fuses_with_its_weight_through_the_no_op_cast():
    model = _exported(LlamaRMSNorm(), opset=23)
    assert op_counts(model) == {"Cast": 2, "Pow": 1, "ReduceMean": 1, "Add": 1, "Sqrt": 1, "Div": 1, "Mul": 2}
    fused, stats = _fused(model)
    assert stats == {"rms-norm": 1, "normalization-scale": 1}
    assert op_counts(fused) == {"Cast": 1, "RMSNormalization": 1}  # the float32-to-float32 Cast of the input
    node = next(n for n in fused.graph.nodes if n.op == "RMSNormalization")
    assert node.attrs["epsilon"] == pytest.approx(1e-6)
    assert _error(model, fused) < 1e-4


@pytest.mark.parametrize("divide", ["Div", "Reciprocal", "rsqrt"])
@pytest.mark.parametrize("square", ["Pow", "Mul"])
def test_rms_norm_spellings_fuse_to_rms_normalization(divide, square):
    proto = _rms_norm_graph(square=square, divide=divide, gamma=GAMMA)
    fused, stats = _fused(proto, backend="tvm")
    assert stats == {"rms-norm": 1, "normalization-scale": 1}
    assert op_counts(fused) == {"RMSNormalization": 1}
    assert _error(proto, fused) < 1e-4


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_rms_norm_below_opset_23_is_left_alone(backend):
    # onnxruntime's SimplifiedLayerNormalization is registered in the ONNX domain: onnx.checker refuses it.
    model = _exported(LlamaRMSNorm(), opset=20)
    _, stats = _fused(model, backend)
    assert not stats


def test_rms_norm_over_an_axis_that_is_not_last_is_left_alone():
    proto = _rms_norm_graph(axes=(1,))
    _, stats = _fused(proto)
    assert not stats


# --- the pipeline ---------------------------------------------------------------------------------------


class PreNormBlock(nn.Module):
    """A pre-norm MLP block with both norms written out: LayerNorm, then RMSNorm."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm((width,)), LlamaRMSNorm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(torch.relu(self.up(self.norm1(x))))
        return self.norm2(x)


@pytest.mark.parametrize("opset", [17, 23])
def test_optimize_fuses_the_norms_of_a_pytorch_block_and_verifies_them(opset):
    torch.manual_seed(0)
    model = from_torch(PreNormBlock().eval(), torch.randn(2, 5, 16), ["x"], ["y"], opset=opset)
    optimized, report = onnxforge.optimize(model, "cleanup,fuse", seed=0)
    fuse = next(record for record in report.passes if record.name == "fuse")
    assert fuse.status == "applied"
    counts = op_counts(optimized)
    assert counts["LayerNormalization"] == 1 and "Sub" not in counts
    if opset >= 23:
        expected = {"layer-norm": 1, "rms-norm": 1, "normalization-scale": 2, "normalization-bias": 1}
        assert counts["RMSNormalization"] == 1 and "Sqrt" not in counts
    else:
        expected = {"layer-norm": 1, "normalization-scale": 1, "normalization-bias": 1}
        assert "rms-norm" not in fuse.stats and counts["Sqrt"] == 1
    assert expected.items() <= fuse.stats.items()
    assert _error(model, optimized) < 1e-4
