"""What the lossy passes offer a search (`optimize --auto`): their tunables on small models, with and without
--data and per target; every value builds the pass. And onnxruntime's parallel execution mode."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_checks import apply, constant, make_model, value_info
from onnx import helper
from test_lowrank import conv_model, low_rank, matmul_model
from test_quant_pass import _conv_net, _embedding_model, _mlp

from onnxforge.backends import BackendOptions, get_backend
from onnxforge.errors import BackendError
from onnxforge.ir import load_model
from onnxforge.passes.quantization.quant import resolve_format
from onnxforge.pipeline.registry import get_pass
from onnxforge.pipeline.tunables import Choice, Interval, SearchTarget, Subset

RNG = np.random.default_rng(0)
CPU, CPU_DATA = SearchTarget(), SearchTarget(has_data=True)


def _space(name: str, source: onnx.ModelProto, where: SearchTarget = CPU):
    return get_pass(name).search_space(load_model(source), where)


def _relu_only() -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [2, 8])], [value_info("y", [2, 8])])


def _conv_then_gemm() -> onnx.ModelProto:
    """Conv -> GlobalAveragePool -> Flatten -> Gemm (transB), as a CNN's classifier ends."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "b"], ["y"], transB=1, name="fc"),
    ]
    initializers = [
        constant("w", RNG.standard_normal((64, 8, 3, 3)).astype(np.float32)),
        constant("fc", RNG.standard_normal((10, 64)).astype(np.float32)),
        constant("b", np.zeros(10, np.float32)),
    ]
    return make_model(nodes, [value_info("x", [1, 8, 8, 8])], [value_info("y", [1, 10])], initializers)


def _lstm() -> onnx.ModelProto:
    hidden, features = 16, 8
    weights = [RNG.standard_normal(shape).astype(np.float32) for shape in ((1, 64, 8), (1, 64, 16), (1, 128))]
    return make_model(
        [helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], hidden_size=hidden)],
        [value_info("x", [5, 1, features])],
        [value_info("y", None)],
        [constant(name, array) for name, array in zip("wrb", weights)],
    )


PRUNE_NO_DATA = {"ratio": Interval(0.05, 0.5, 0.05), "scope": Choice(("layer", "global")), "method": Choice(("l1",))}
PRUNE_DATA = {**PRUNE_NO_DATA, "method": Choice(("l1", "activation")), "recover": Choice((True,))}


@pytest.mark.parametrize(("where", "expected"), [(CPU, PRUNE_NO_DATA), (CPU_DATA, PRUNE_DATA)])
def test_prune_offers_ratio_scope_and_with_data_activations_and_recovery(where, expected):
    assert _space("prune", _conv_net(), where) == expected


def test_prune_offers_no_scope_for_a_single_layer_and_nothing_without_one():
    assert "scope" not in _space("prune", matmul_model(low_rank(64, 64, 8)))
    assert _space("prune", _relu_only()) is None


def _named_mlp(names: list[str], width: int = 32) -> onnx.ModelProto:
    """x -> (MatMul named names[i] -> Relu) ... -> MatMul named "head" -> y: one channel group per named layer."""
    nodes, weights, current = [], [], "x"
    for index, name in enumerate([*names, "head"]):
        rows, cols = 16 if index == 0 else width, 4 if name == "head" else width
        weights.append(constant(f"w{index}", RNG.standard_normal((rows, cols)).astype(np.float32)))
        out = "y" if name == "head" else f"r{index}"
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [out if name == "head" else f"m{index}"],
                                      name=name))
        if name != "head":
            nodes.append(helper.make_node("Relu", [f"m{index}"], [out]))
        current = out
    return make_model(nodes, [value_info("x", [2, 16])], [value_info("y", [2, 4])], weights)


def test_prune_offers_which_groups_to_prune_where_there_are_few_and_their_names_fit_a_pass_list():
    assert _space("prune", _named_mlp(["fc0", "fc1"]), CPU_DATA)["exclude"] == Subset(("fc0", "fc1"))
    assert "exclude" not in _space("prune", _named_mlp(["fc0"]))  # one group: the ratio says it all
    assert "exclude" not in _space("prune", _named_mlp([f"fc{i}" for i in range(13)]))  # too many to search
    assert "exclude" not in _space("prune", _named_mlp(["fc0", "block:1"]))  # ':' cannot go through exclude=
    # A candidate leaving fc0 out prunes fc1 alone.
    pruned, result = apply("prune:ratio=0.5:exclude=fc0:measure=false", _named_mlp(["fc0", "fc1"]))
    weights = {node.name: tuple(node.inputs[1].shape) for node in pruned.graph.nodes if node.op == "MatMul"}
    assert result.changed and weights == {"fc0": (16, 32), "fc1": (32, 16), "head": (16, 4)}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (CPU, {"ratio": Interval(0.3, 0.9, 0.1)}),
        (CPU_DATA, {"ratio": Interval(0.3, 0.9, 0.1), "method": Choice(("svd", "whitened")), "recover": Choice((True,))}),
    ],
)
def test_lowrank_offers_a_budget_and_with_data_the_whitened_method(where, expected):
    assert _space("lowrank", matmul_model(low_rank(64, 64, 8)), where) == expected


def _depthwise_conv() -> onnx.ModelProto:
    weight = constant("w", RNG.standard_normal((64, 1, 9, 9)).astype(np.float32))  # 5184 weights, in groups
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=64, pads=[4, 4, 4, 4])
    return make_model([node], [value_info("x", [1, 64, 12, 12])], [value_info("y", [1, 64, 12, 12])], [weight])


def test_lowrank_is_offered_for_a_conv_of_min_size_weights():
    assert _space("lowrank", conv_model(RNG.standard_normal((64, 1, 9, 9)).astype(np.float32))) is not None


@pytest.mark.parametrize(
    "build",
    [lambda: matmul_model(low_rank(32, 64, 8)), _depthwise_conv, _relu_only],
    ids=["matmul-below-min-size", "grouped-conv", "no-layer"],
)
def test_lowrank_is_not_offered_without_a_weight_it_factors(build):
    assert _space("lowrank", build()) is None


def test_quant_offers_4_bits_where_matmuls_take_them_and_a_float_prefix():
    assert _space("quant", _mlp()) == {"bits": Choice((8, 4)), "float_prefix": Choice((False, True))}
    assert _space("quant", _conv_net())["bits"] == Choice((8,))


def test_quant_with_data_offers_conv_calibration_and_dynamic_mode():
    assert _space("quant", _conv_net(), CPU_DATA) == {
        "bits": Choice((8,)),
        "calibration": Choice(("minmax", "percentile", "entropy")),
        "mode": Choice(("auto", "dynamic")),
        "float_prefix": Choice((False, True)),
    }
    assert "calibration" not in _space("quant", _mlp(), CPU_DATA)  # MatMuls stay dynamic: nothing calibrated


def test_quant_leaves_out_mode_where_4_bits_are_offered_and_excludes_the_types_gemms_become():
    space = _space("quant", _conv_then_gemm(), CPU_DATA)
    assert space["bits"] == Choice((8, 4)) and "mode" not in space  # bits=4 with mode=dynamic cannot run
    assert space["exclude"] == Subset(("Conv", "MatMul"))  # the Gemm is quantized as a MatMul
    assert _space("quant", _embedding_model())["exclude"] == Subset(("Gather", "MatMul"))


def test_quant_is_not_offered_without_a_layer_it_takes_on_the_backend_or_on_a_quantized_model():
    assert _space("quant", _relu_only()) is None
    quantized, _ = apply("quant:measure=false", _mlp())
    assert get_pass("quant").search_space(quantized, CPU) is None
    assert _space("quant", _lstm())["bits"] == Choice((8,))
    assert _space("quant", _lstm(), SearchTarget(backend="tvm")) is None  # int8 LSTM is onnxruntime's op


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize(
    ("backend", "target", "offered"),
    [("ort", "cpu", False), ("tvm", "cpu", False), ("tvm", "aarch64", False), ("tvm", "cuda", True),
     ("tvm", "cuda:sm_80", True)],
)
def test_half_precision_is_offered_at_its_defaults_on_cuda_only(name, backend, target, offered):
    for has_data in (False, True):
        space = _space(name, _mlp(), SearchTarget(backend, target, has_data))
        assert space == ({} if offered else None)


CASES = [
    ("prune", _conv_net, CPU_DATA),
    ("prune", _conv_net, CPU),
    ("lowrank", lambda: matmul_model(low_rank(64, 64, 8)), CPU_DATA),
    ("quant", _conv_net, CPU_DATA),
    ("quant", _conv_then_gemm, CPU_DATA),
    ("quant", _embedding_model, CPU),
    ("fp16", _mlp, SearchTarget("tvm", "cuda")),
    ("bf16", _mlp, SearchTarget("tvm", "cuda")),
]


def _extremes(tunable) -> list:
    """The values of a tunable at its ends: every choice, both ends of an interval, none and all of a subset."""
    if isinstance(tunable, Choice):
        return list(tunable.values)
    if isinstance(tunable, Interval):
        return [tunable.values()[0], tunable.values()[-1]]
    return [[], list(tunable.items)]


@pytest.mark.parametrize(("name", "build", "where"), CASES)
def test_every_combination_of_extreme_values_builds_the_pass(name, build, where):
    pass_type = get_pass(name)
    source = build()
    space = pass_type.search_space(load_model(source), where)
    fields = {f.name for f in dataclasses.fields(pass_type.Options)}
    assert set(space) <= fields
    for values in itertools.product(*map(_extremes, space.values())):
        built = pass_type(**dict(zip(space, values)))
        if name == "quant":  # each combination resolves to layer formats the model's opset takes
            resolve_format(built.options, source.opset_import[0].version, contrib_ops=True)


def test_interval_values_step_from_low_to_high():
    assert Interval(0.1, 0.5, 0.1).values() == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert Interval(0.3, 0.9, 0.1).values()[-1] == 0.9


def _two_branches() -> onnx.ModelProto:
    """x -> MatMul -> Relu and x -> MatMul -> Sigmoid, added: two branches a parallel session runs at once."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("MatMul", ["x", "w2"], ["b"]),
        helper.make_node("Sigmoid", ["b"], ["sb"]),
        helper.make_node("Add", ["ra", "sb"], ["y"]),
    ]
    weights = [constant(name, RNG.standard_normal((32, 16)).astype(np.float32)) for name in ("w1", "w2")]
    return make_model(nodes, [value_info("x", ["batch", 32])], [value_info("y", ["batch", 16])], weights)


def test_parallel_execution_gives_the_same_outputs_as_sequential():
    backend, source = get_backend("ort"), _two_branches()
    x = {"x": RNG.standard_normal((4, 32)).astype(np.float32)}
    sequential = backend.prepare(source)
    parallel = backend.prepare(source, BackendOptions(execution_mode="parallel"))

    np.testing.assert_allclose(parallel.run(x)["y"], sequential.run(x)["y"], rtol=1e-6, atol=1e-6)
    options = parallel.session.get_session_options()
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.inter_op_num_threads == 0
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert sequential.session.get_session_options().execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert sequential.session.get_session_options().inter_op_num_threads == 1


def test_an_unknown_execution_mode_raises_backend_error():
    with pytest.raises(BackendError, match="execution mode 'threads'"):
        BackendOptions(execution_mode="threads")
