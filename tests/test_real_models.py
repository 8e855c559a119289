"""`cleanup` on real models: the light_* zoo models shipped with onnx, and models exported from PyTorch.

On each: nothing is rolled back, the node count never grows, the outputs stay within 1e-4 (relative) on fresh
random inputs in onnxruntime, and what cleanup exists to remove is gone. Each model is optimized once per
session (cached) and shared by the cleanup and the save/load tests.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxforge
from onnxforge.backends import get_backend
from onnxforge.comparison import compare_outputs
from onnxforge.data import random_inputs
from onnxforge.ir import Model, load_model, save_model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.report import OptimizationReport

RTOL = 1e-4
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(path.stem for path in LIGHT_DIR.glob("light_*.onnx"))
# VGG-19's constant-filled 4096x25088 weight makes each onnxruntime session take seconds: ~30 s for its two tests.
SLOW_LIGHT_MODELS = {"light_vgg19"}
TORCH_MODELS = ["cnn", "transformer", "bert", "speech_rnn", "control_flow", "tied_weights"]


@dataclass
class Cleaned:
    """A model, its cleaned-up version with the run's report, and the outputs of both on two random input sets."""

    original: Model
    optimized: Model
    report: OptimizationReport
    inputs: list[dict[str, np.ndarray]]
    original_outputs: list[dict[str, np.ndarray]]
    optimized_outputs: list[dict[str, np.ndarray]]


def _clean(model: Model, shapes: dict[str, list[int]] | None = None) -> Cleaned:
    optimized, report = onnxforge.optimize(model, "cleanup", seed=0)
    proto = skeleton_proto(model)
    inputs = [random_inputs(proto, shapes=shapes, seed=seed) for seed in (1, 2)]
    return Cleaned(model, optimized, report, inputs, _run(model, inputs), _run(optimized, inputs))


def _run(model: Model, inputs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    prepared = get_backend("ort").prepare(model)
    return [prepared.run(x) for x in inputs]


def _op_counts(model: Model, main_graph_only: bool = False) -> Counter:
    graphs = [model.graph] if main_graph_only else model.graphs()
    return Counter(node.op for graph in graphs for node in graph.nodes)


def _assert_lossless_and_not_larger(cleaned: Cleaned) -> None:
    records = [(record.name, record.status, record.error) for record in cleaned.report.passes]
    assert records in ([("cleanup", "applied", "")], [("cleanup", "unchanged", "")]), records
    assert cleaned.optimized.stats().nodes <= cleaned.original.stats().nodes
    assert cleaned.report.after.nodes <= cleaned.report.before.nodes
    assert [t.name for t in cleaned.optimized.graph.inputs] == [t.name for t in cleaned.original.graph.inputs]
    assert [t.name for t in cleaned.optimized.graph.outputs] == [t.name for t in cleaned.original.graph.outputs]
    error = compare_outputs(cleaned.original_outputs, cleaned.optimized_outputs).max_rel
    assert error <= RTOL, f"outputs changed by {error:.3g} (relative)"


def _assert_inputs_matter(cleaned: Cleaned) -> None:
    """Fail when the outputs are the same for both input sets: comparing them would then prove nothing."""
    first, second = cleaned.original_outputs
    assert any(not np.allclose(first[name], second[name], rtol=1e-5, atol=0) for name in first)


def _assert_round_trip(model: Model, outputs: list[dict[str, np.ndarray]], inputs, path: Path) -> None:
    save_model(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    reloaded = load_model(path)
    assert reloaded.stats() == model.stats()
    assert _op_counts(reloaded) == _op_counts(model)
    assert compare_outputs(outputs, _run(reloaded, inputs)).max_rel <= 1e-6


# The light_* models -------------------------------------------------------------------------------------------


def _light_params() -> list:
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW_LIGHT_MODELS else name for name in LIGHT_MODELS
    ]


def _light_model(name: str) -> Model:
    """The zoo model with its logits and five of its Conv results added as graph outputs.

    Its weights are constant-filled, so every class gets the same logit and the softmax output is 1/1000 for any
    input: alone, it would show no numerical difference at all. (In DenseNet-121 and Inception-v2 even the
    later convolutions give the same result for every input; the first ones never do.)
    """
    proto = onnx.load(str(LIGHT_DIR / f"{name}.onnx"))
    convs = [node.output[0] for node in proto.graph.node if node.op_type == "Conv"]
    extra = [convs[(len(convs) - 1) * k // 4] for k in range(5)]
    last = proto.graph.node[-1]
    if last.op_type == "Softmax":
        extra.append(last.input[0])
    # Declared with their inferred shapes: the full checker wants a shape on every graph output.
    inferred = {info.name: info for info in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(inferred[tensor] for tensor in dict.fromkeys(extra) if tensor not in present)
    return load_model(proto)


@functools.cache
def _cleaned_light(name: str) -> Cleaned:
    return _clean(_light_model(name))


def test_onnx_ships_the_light_models():
    expected = {"light_resnet50", "light_densenet121", "light_inception_v1", "light_squeezenet", "light_vgg19"}
    assert expected <= set(LIGHT_MODELS), f"found only {LIGHT_MODELS} in {LIGHT_DIR}"


@pytest.mark.parametrize("name", _light_params())
def test_cleanup_keeps_light_model_outputs_and_removes_nodes(name):
    cleaned = _cleaned_light(name)
    _assert_lossless_and_not_larger(cleaned)
    _assert_inputs_matter(cleaned)
    # Every light model computes its small constant-filled biases with ConstantOfShape: those fold.
    assert cleaned.report.passes[0].status == "applied"
    assert cleaned.optimized.stats().nodes < cleaned.original.stats().nodes
    after = _op_counts(cleaned.optimized)
    assert after["Identity"] == 0 and after["Dropout"] == 0
    assert after["ConstantOfShape"] < _op_counts(cleaned.original)["ConstantOfShape"]


@pytest.mark.parametrize("name", _light_params())
def test_light_models_round_trip_through_save_and_load(name, tmp_path):
    cleaned = _cleaned_light(name)
    # These models declare IR version 3, where every initializer had to be a graph input as well.
    assert onnx.load(str(LIGHT_DIR / f"{name}.onnx"), load_external_data=False).ir_version == 3
    _assert_round_trip(cleaned.original, cleaned.original_outputs, cleaned.inputs, tmp_path / "original.onnx")
    _assert_round_trip(cleaned.optimized, cleaned.optimized_outputs, cleaned.inputs, tmp_path / "optimized.onnx")


# Models exported from PyTorch ----------------------------------------------------------------------------------


@functools.cache
def _torch_cases() -> dict:
    pytest.importorskip("torch")
    from model_builders import torch_cases

    return torch_cases()


@functools.cache
def _exported(name: str, fold: bool) -> Model:
    from onnxforge.frontends.torch import from_torch

    case = _torch_cases()[name]
    return from_torch(
        case.module, case.example_inputs, case.input_names, case.output_names, do_constant_folding=fold
    )


@functools.cache
def _cleaned_torch(name: str, fold: bool) -> Cleaned:
    return _clean(_exported(name, fold))


# Op types cleanup must leave none of (anywhere, subgraphs included), beyond Identity/Dropout/Shape/Constant.
GONE_AFTER_CLEANUP = {
    "cnn": set(),
    "transformer": {"Cast", "Concat", "Div", "Mod", "Slice", "Sqrt"},
    "bert": {"ConstantOfShape", "Concat", "Equal", "Expand", "Where"},
    "speech_rnn": {"Expand", "Gather", "Slice", "Unsqueeze"},
    "control_flow": set(),
    "tied_weights": {"Transpose"},
}


def test_the_builders_make_every_listed_model():
    assert sorted(_torch_cases()) == sorted(TORCH_MODELS)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_cleanup_keeps_exported_model_outputs(name, fold):
    cleaned = _cleaned_torch(name, fold)
    _assert_lossless_and_not_larger(cleaned)
    _assert_inputs_matter(cleaned)
    main = _op_counts(cleaned.optimized, main_graph_only=True)
    # Constant nodes become initializers; every shape here is static, so no Shape survives.
    assert main["Identity"] == main["Dropout"] == main["Constant"] == 0, main
    everywhere = _op_counts(cleaned.optimized)
    assert everywhere["Shape"] == 0 and everywhere["Size"] == 0, everywhere
    assert not {op for op in GONE_AFTER_CLEANUP[name] if everywhere[op]}, everywhere


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_cleanup_shrinks_exports_made_without_constant_folding(name):
    folded, unfolded = _exported(name, True), _exported(name, False)
    cleaned = _cleaned_torch(name, False)
    assert cleaned.report.passes[0].status == "applied"
    assert cleaned.optimized.stats().nodes < unfolded.stats().nodes
    # No more is left than the exporter's own constant folding leaves, but for the LSTM weight Concat that
    # fold-constants keeps (its result is larger than any weight of the model) and the CNN's BatchNorms,
    # which the exporter folds into the convolutions and cleanup does not (that is a fusion).
    slack = {"speech_rnn": 1, "cnn": 3}.get(name, 0)
    assert cleaned.optimized.stats().nodes <= folded.stats().nodes + slack


@pytest.mark.parametrize("name", ["transformer", "bert", "control_flow", "tied_weights"])
def test_cleanup_of_an_unfolded_export_matches_cleanup_of_the_folded_one(name):
    assert _op_counts(_cleaned_torch(name, False).optimized) == _op_counts(_cleaned_torch(name, True).optimized)


def test_cleanup_leaves_a_folded_cnn_alone():
    # The exporter already folded BatchNorm into the convolutions and dropped Dropout: nothing is left to do.
    cleaned = _cleaned_torch("cnn", True)
    assert cleaned.report.passes[0].status == "unchanged"
    assert _op_counts(cleaned.optimized) == _op_counts(cleaned.original)


def test_cleanup_does_not_fuse_batchnorm_in_an_unfolded_cnn():
    # Removing the exporter's Identity nodes is cleanup's job; folding BatchNorm into Conv is a fusion's.
    before, after = _op_counts(_exported("cnn", False)), _op_counts(_cleaned_torch("cnn", False).optimized)
    assert before["Identity"] > 0 and after["Identity"] == 0
    assert after["BatchNormalization"] == before["BatchNormalization"] == 3


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_a_linear_applied_twice_reads_one_initializer_after_cleanup(fold):
    # The folded export passes the shared weight through an Identity; the unfolded one transposes it twice.
    model = _cleaned_torch("tied_weights", fold).optimized
    matmuls = [node for node in model.graph.nodes if node.op == "MatMul"]
    mix_weights = {id(node.inputs[1]) for node in matmuls if "/mix" in node.outputs[0].name}
    assert len(mix_weights) == 1
    assert _op_counts(model) == Counter({"MatMul": 3, "Add": 2, "Gather": 1, "Relu": 1})


def test_control_flow_export_keeps_loop_and_if_with_their_bodies():
    cleaned = _cleaned_torch("control_flow", True)
    main = _op_counts(cleaned.optimized, main_graph_only=True)
    assert main["Loop"] == 1 and main["If"] == 1
    bodies = list(cleaned.optimized.graphs())[1:]
    assert len(bodies) == 3 and all(body.nodes for body in bodies)
    # The Loop body's condition output is an Identity of an outer constant: a subgraph output cannot be
    # produced by the outer graph, so that Identity has to stay.
    assert _op_counts(cleaned.optimized)["Identity"] == 1


def test_dynamic_shape_bert_keeps_its_shape_computations():
    from onnxforge.frontends.torch import from_torch

    case = _torch_cases()["bert"]
    axes = {name: {0: "batch", 1: "sequence"} for name in case.input_names}
    axes.update({name: {0: "batch"} for name in case.output_names})
    model = from_torch(case.module, case.example_inputs, case.input_names, case.output_names, dynamic_axes=axes)
    # Other shapes than the export's (2 x 16) and the verifier's (1 x 16).
    cleaned = _clean(model, shapes={"input_ids": [3, 7], "attention_mask": [3, 7]})
    _assert_lossless_and_not_larger(cleaned)
    assert cleaned.report.passes[0].status == "applied"
    assert cleaned.optimized.stats().nodes < model.stats().nodes
    after = _op_counts(cleaned.optimized)
    assert after["Identity"] == 0 and after["Shape"] > 0


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_exported_models_round_trip_through_save_and_load(name, fold, tmp_path):
    cleaned = _cleaned_torch(name, fold)
    _assert_round_trip(cleaned.original, cleaned.original_outputs, cleaned.inputs, tmp_path / "original.onnx")
    _assert_round_trip(cleaned.optimized, cleaned.optimized_outputs, cleaned.inputs, tmp_path / "optimized.onnx")
