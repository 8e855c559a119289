"""fuse-activations: decomposed GELU, SiLU and HardSwish as exporters write them become single ops."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from graph_checks import apply, max_rel_error, op_counts
from model_builders import torch_cases
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnxforge
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import Model
from onnxforge.pipeline import PassContext, create_passes


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


GELU_ERF_MODULES = {
    "nn.GELU": nn.GELU(),
    "F.gelu": Lambda(F.gelu),
    "by hand": Lambda(lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))),
}
GELU_TANH_MODULES = {
    "nn.GELU(tanh)": nn.GELU(approximate="tanh"),
    "gelu_new, pow": Lambda(
        lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    ),
    "x*x*x": Lambda(lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))),
    "gelu_fast": Lambda(lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))),
}


def _exported(module: nn.Module, opset: int) -> Model:
    """The module exported from PyTorch and cleaned up (constants folded into initializers)."""
    torch.manual_seed(0)
    model = from_torch(module, torch.randn(2, 5, 16), ["x"], ["y"], opset=opset)
    (cleanup,) = create_passes("cleanup")
    cleanup.run(model, PassContext())
    return model


def _fused(model: Model | onnx.ModelProto, backend: str = "ort") -> tuple[Model, dict]:
    """A fused copy of the model, and the pass's counters."""
    fused, result = apply("fuse-activations", model, backend)
    return fused, result.stats


def _graph(nodes, opset=17, initializers=(), dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, [2, 5, 16])],
        [helper.make_tensor_value_info("y", dtype, [2, 5, 16])],
        [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _error(before: Model | onnx.ModelProto, after: Model) -> float:
    return max_rel_error(before, after, graph_optimization="disable")


# --- GELU -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", GELU_ERF_MODULES)
def test_gelu_erf_exports_fuse_to_contrib_gelu_below_opset_20_on_onnxruntime(spelling):
    model = _exported(GELU_ERF_MODULES[spelling], opset=17)
    assert op_counts(model) == {"Div": 1, "Erf": 1, "Add": 1, "Mul": 2}
    fused, stats = _fused(model)
    assert stats == {"gelu-erf": 1}
    assert op_counts(fused) == {"Gelu": 1}
    assert fused.graph.nodes[0].domain == "com.microsoft"
    assert _error(model, fused) < 1e-6


@pytest.mark.parametrize("spelling", GELU_TANH_MODULES)
def test_gelu_tanh_exports_fuse_to_fast_gelu_below_opset_20_on_onnxruntime(spelling):
    model = _exported(GELU_TANH_MODULES[spelling], opset=18)
    assert op_counts(model)["Tanh"] == 1
    fused, stats = _fused(model)
    assert stats == {"gelu-tanh": 1}
    assert op_counts(fused) == {"FastGelu": 1}
    assert fused.graph.nodes[0].domain == "com.microsoft"
    assert _error(model, fused) < 1e-5


def test_gelu_tanh_from_the_dynamo_exporter_fuses_to_fast_gelu():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            nn.GELU(approximate="tanh"), (torch.randn(2, 5, 16),), dynamo=True, opset_version=18, verbose=False
        )
    model, _ = onnxforge.optimize(program.model_proto, "cleanup", seed=0)
    assert op_counts(model)["Tanh"] == 1
    fused, stats = _fused(model)
    assert stats == {"gelu-tanh": 1}
    assert op_counts(fused) == {"FastGelu": 1}
    assert _error(model, fused) < 1e-5


def _tanh_gelu(cubic: float, scale: float) -> onnx.ModelProto:
    """0.5 * x * (1 + tanh(scale * (x + cubic * x * x * x))) in float32, nn.GELU(approximate="tanh")'s form."""
    return _graph(
        [
            helper.make_node("Mul", ["x", "x"], ["xx"]),
            helper.make_node("Mul", ["x", "xx"], ["x3"]),
            helper.make_node("Mul", ["x3", "cubic"], ["c"]),
            helper.make_node("Add", ["x", "c"], ["inner"]),
            helper.make_node("Mul", ["inner", "scale"], ["arg"]),
            helper.make_node("Tanh", ["arg"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["a"]),
            helper.make_node("Mul", ["x", "a"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"]),
        ],
        initializers=[("cubic", cubic), ("scale", scale), ("one", 1.0), ("half", 0.5)],
    )


SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@pytest.mark.parametrize(
    "cubic, scale",
    [(0.044715, SQRT_2_OVER_PI), (float(np.float32(0.044715)), float(np.float32(SQRT_2_OVER_PI))), (0.044715, 0.7978845608)],
    ids=["float64 values", "float32 values", "sqrt(2/pi) written with 10 digits"],
)
def test_gelu_tanh_fuses_with_its_constants_as_exporters_write_them(cubic, scale):
    proto = _tanh_gelu(cubic, scale)
    fused, stats = _fused(proto)
    assert stats == {"gelu-tanh": 1}
    assert _error(proto, fused) < 1e-5


@pytest.mark.parametrize(
    "cubic, scale, named",
    [
        (float(np.float16(0.044715)), SQRT_2_OVER_PI, "the cubic coefficient is 0.04470825"),
        (0.044715, float(np.float16(SQRT_2_OVER_PI)), "the tanh scale is 0.797851"),
        (0.0447, SQRT_2_OVER_PI, "the cubic coefficient is 0.0447"),
    ],
    ids=["0.044715 rounded to fp16", "sqrt(2/pi) rounded to fp16", "0.0447"],
)
def test_gelu_tanh_is_not_fused_with_a_constant_near_its_own_and_says_why(cubic, scale, named):
    fused, result = apply("fuse-activations", _tanh_gelu(cubic, scale))
    assert not result.stats
    assert op_counts(fused)["Tanh"] == 1
    (note,) = result.notes
    assert note.startswith("gelu-tanh declined at 1 place") and named in note and "as the fused op computes it" in note


@pytest.mark.parametrize("divisor, fused", [(6.0, True), (float(np.float16(6.0009)), True), (6.004, False)])
def test_hardswish_literals_match_only_their_float32_value(divisor, fused):
    # 6.0009 rounds to 6.0 in float16; 6.004 is within the 1e-3 a pattern literal used to accept.
    proto = _graph(
        [
            helper.make_node("Add", ["x", "three"], ["a"]),
            helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
            helper.make_node("Mul", ["x", "c"], ["m"]),
            helper.make_node("Div", ["m", "divisor"], ["y"]),
        ],
        initializers=[("three", 3.0), ("zero", 0.0), ("six", 6.0), ("divisor", divisor)],
    )
    _, stats = _fused(proto)
    assert bool(stats) == fused


def test_hardswish_from_hard_sigmoid_with_a_slope_near_one_sixth_is_left_alone():
    proto = _graph(
        [
            helper.make_node("HardSigmoid", ["x"], ["s"], alpha=float(np.float16(1 / 6))),
            helper.make_node("Mul", ["x", "s"], ["y"]),
        ]
    )
    _, stats = _fused(proto)
    assert not stats


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_decomposed_gelu_becomes_standard_gelu_from_opset_20_for_any_backend(backend):
    # nn.GELU exports Gelu itself at opset 20; formulas written by hand stay decomposed.
    erf = _exported(GELU_ERF_MODULES["by hand"], opset=20)
    tanh = _exported(GELU_TANH_MODULES["gelu_new, pow"], opset=20)
    for model, approximate in ((erf, "none"), (tanh, "tanh")):
        fused, _ = _fused(model, backend)
        assert op_counts(fused) == {"Gelu": 1}
        (node,) = fused.graph.nodes
        assert node.domain in (None, "") and node.attrs["approximate"] == approximate
        assert _error(model, fused) < 1e-5


def test_gelu_is_left_alone_below_opset_20_when_the_backend_is_not_onnxruntime():
    model = _exported(nn.GELU(), opset=17)
    fused, result = apply("fuse-activations", model, "tvm")
    assert not result.stats
    assert op_counts(fused) == op_counts(model)
    (note,) = result.notes
    assert note.startswith("gelu-erf declined at 1 place") and note.endswith(
        ": Gelu needs opset 20 (the model has 17) where the backend does not run onnxruntime's contrib ops: "
        "put upgrade-opset:to=20 before fuse"
    )


def test_gelu_with_x_times_one_over_sqrt2_fuses():
    proto = _graph(
        [
            helper.make_node("Mul", ["x", "rsqrt2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["one", "e"], ["a"]),
            helper.make_node("Mul", ["a", "half"], ["h"]),
            helper.make_node("Mul", ["x", "h"], ["y"]),
        ],
        initializers=[("rsqrt2", 1 / math.sqrt(2)), ("one", 1.0), ("half", 0.5)],
    )
    fused, stats = _fused(proto)
    assert stats == {"gelu-erf": 1}
    assert op_counts(fused) == {"Gelu": 1}
    assert _error(proto, fused) < 1e-6


def test_gelu_in_double_precision_is_left_alone():
    proto = _graph(
        [
            helper.make_node("Div", ["x", "sqrt2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["a"]),
            helper.make_node("Mul", ["x", "a"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"]),
        ],
        dtype=TensorProto.DOUBLE,
    )
    for name, value in (("sqrt2", math.sqrt(2)), ("one", 1.0), ("half", 0.5)):
        proto.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float64), name))
    fused, stats = _fused(proto, backend="ort")
    assert not stats
    assert op_counts(fused)["Erf"] == 1


# --- SiLU -----------------------------------------------------------------------------------------------


def test_silu_becomes_quick_gelu_with_alpha_1_on_onnxruntime():
    model = _exported(nn.SiLU(), opset=17)
    assert op_counts(model) == {"Sigmoid": 1, "Mul": 1}
    fused, stats = _fused(model)
    assert stats == {"silu": 1}
    (node,) = fused.graph.nodes
    assert (node.op, node.domain, node.attrs["alpha"]) == ("QuickGelu", "com.microsoft", 1.0)
    assert _error(model, fused) < 1e-6


def test_silu_becomes_standard_swish_from_opset_24_for_other_backends():
    proto = _graph([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])], opset=24)
    fused, stats = _fused(proto, backend="tvm")
    assert stats == {"silu": 1}
    assert op_counts(fused) == {"Swish": 1}
    assert _error(proto, fused) < 1e-6


def test_silu_is_left_alone_below_opset_24_for_other_backends():
    model = _exported(nn.SiLU(), opset=20)
    fused, stats = _fused(model, backend="tvm")
    assert not stats
    assert op_counts(fused) == {"Sigmoid": 1, "Mul": 1}


# --- HardSwish ------------------------------------------------------------------------------------------


HARDSWISH_MODULES = {
    "x * hardsigmoid(x)": Lambda(lambda x: x * F.hardsigmoid(x)),
    "x * relu6(x + 3) / 6": Lambda(lambda x: x * F.relu6(x + 3) / 6),
    "x * (clamp(x + 3, 0, 6) / 6)": Lambda(lambda x: x * (torch.clamp(x + 3, 0, 6) / 6.0)),
    "x * clamp(x + 3, 0, 6) * (1/6)": Lambda(lambda x: x * torch.clamp(x + 3, 0, 6) * (1 / 6)),
}


@pytest.mark.parametrize("spelling", HARDSWISH_MODULES)
@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_hardswish_spellings_become_standard_hardswish(spelling, backend):
    model = _exported(HARDSWISH_MODULES[spelling], opset=17)
    fused, stats = _fused(model, backend)
    assert stats == {"hardswish": 1}
    assert op_counts(fused) == {"HardSwish": 1}
    assert _error(model, fused) < 1e-6


def test_hardswish_below_opset_14_is_left_alone():
    model = _exported(nn.Hardswish(), opset=13)  # opset 13 has no HardSwish: HardSigmoid(alpha=1/6) * x
    assert op_counts(model) == {"HardSigmoid": 1, "Mul": 1}
    for backend in ("ort", "tvm"):
        fused, stats = _fused(model, backend)
        assert not stats
        assert op_counts(fused) == {"HardSigmoid": 1, "Mul": 1}


def test_x_times_hard_sigmoid_with_other_slope_is_not_hardswish():
    proto = _graph(
        [helper.make_node("HardSigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    )  # alpha 0.2 by default
    _, stats = _fused(proto)
    assert not stats


# --- the pipeline ---------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Three activations in their exported forms: GELU (tanh), SiLU and a hand-written HardSwish."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.gelu = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.layers[0](x))
        x = F.silu(self.layers[1](x))
        x = self.layers[2](x)
        return x * F.relu6(x + 3) / 6


def test_optimize_fuses_the_activations_of_a_pytorch_mlp_and_verifies_them():
    torch.manual_seed(0)
    model = from_torch(Mlp().eval(), torch.randn(2, 5, 16), ["x"], ["y"], opset=17)
    optimized, report = onnxforge.optimize(model, "cleanup,fuse", seed=0)
    fuse = next(record for record in report.passes if record.name == "fuse")
    assert fuse.status == "applied"
    assert {"gelu-tanh": 1, "silu": 1, "hardswish": 1}.items() <= fuse.stats.items()
    counts = op_counts(optimized)
    assert (counts["FastGelu"], counts["QuickGelu"], counts["HardSwish"]) == (1, 1, 1)
    assert not {"Tanh", "Sigmoid", "Clip"} & set(counts)
    assert _error(model, optimized) < 1e-4


def test_optimize_fuses_the_gelu_of_a_bert_encoder():
    case = torch_cases()["bert"]
    model = from_torch(case.module, case.example_inputs, case.input_names, case.output_names, opset=17)
    assert op_counts(model)["Erf"] == 2
    optimized, report = onnxforge.optimize(model, "cleanup,fuse-activations", seed=0)
    assert report.passes[-1].status == "applied"
    assert report.passes[-1].stats == {"gelu-erf": 2}
    assert op_counts(optimized)["Gelu"] == 2 and "Erf" not in op_counts(optimized)
