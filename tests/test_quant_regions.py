"""quant's int8 regions: which ops join a region, the QDQ written around them, onnxruntime's int8 kernels for them,
the function kept on fresh inputs, measured choice and its replay, and models below opset 13 moved to 13."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_checks import apply, constant, held_out_cosine, make_model, op_counts, value_info
from onnx import helper

from onnxforge import optimize
from onnxforge.ir import load_model, save_model
from onnxforge.measure import InterleavedTiming
from onnxforge.calibration.observe import run_model
from onnxforge.comparison import compare_outputs
from onnxforge.passes.quantization.activations import static_activations
from onnxforge.passes.quantization.by_region import fit_float_ends
from onnxforge.passes.quantization.candidates import WeightQuantizer, numbered_layers
from onnxforge.passes.quantization.quant import exposed_copy
from onnxforge.passes.quantization.regions import RegionBuilder, find_regions, region_tensors, shared_ranges
from onnxforge.passes.quantization.rewrite import LayerFormat
from onnxforge.passes.quantization.weights import QuantSpec
from onnxforge.pipeline import PassContext, PassManager, create_passes
from onnxforge.pipeline.budget import Budget

QUICK = InterleavedTiming(blocks=3, block_s=0.01, min_runs=2, warmup=1)


def _conv(name: str, x: str, y: str, channels_in: int, channels_out: int, rng) -> tuple[onnx.NodeProto, list]:
    weight = (rng.standard_normal((channels_out, channels_in, 3, 3)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(channels_out) * 0.1).astype(np.float32)
    node = helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], pads=[1, 1, 1, 1], name=name)
    return node, [constant(f"{name}_w", weight), constant(f"{name}_b", bias)]


def _detector(opset: int = 17) -> onnx.ModelProto:
    """Two int8 regions split by a Softplus (no int8 kernel):
    conv1 -> SiLU (Sigmoid, Mul) -> conv2 -> Add(conv1's output) -> MaxPool, then Softplus, then
    conv3 -> Resize -> Concat(with conv3's output resized again) -> conv4 -> Add(a constant); the same weights at
    every call."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for name, x, y, cin, cout in (
        ("conv1", "x", "c1", 8, 16), ("conv2", "m1", "c2", 16, 16), ("conv3", "s", "c3", 16, 16),
        ("conv4", "cat", "c4", 32, 8),
    ):
        node, constants = _conv(name, x, y, cin, cout, rng)
        nodes.append(node)
        weights += constants
    scales = constant("scales", np.array([1, 1, 2, 2], np.float32))
    roi = constant("roi", np.array([], np.float32))  # an input opsets 11 and 12 require
    offset = constant("offset", (rng.standard_normal((1, 8, 1, 1)) * 0.5).astype(np.float32))
    nodes += [
        helper.make_node("Sigmoid", ["c1"], ["g1"], name="sigmoid1"),
        helper.make_node("Mul", ["c1", "g1"], ["m1"], name="silu1"),
        helper.make_node("Add", ["c2", "c1"], ["a1"], name="residual"),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Softplus", ["p1"], ["s"], name="softplus"),
        helper.make_node("Resize", ["c3", "roi", "scales"], ["u1"], mode="nearest", name="up1"),
        helper.make_node("Resize", ["c3", "roi", "scales"], ["u2"], mode="nearest", name="up2"),
        helper.make_node("Concat", ["u1", "u2"], ["cat"], axis=1, name="concat"),
        helper.make_node("Add", ["c4", "offset"], ["y"], name="head"),
    ]
    nodes = _in_order(nodes)
    return make_model(
        nodes, [value_info("x", [1, 8, 16, 16])], [value_info("y", [1, 8, 16, 16])], [*weights, scales, roi, offset], opset
    )


def _in_order(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` sorted so that each comes after the producers of its inputs."""
    produced, ordered, waiting = {"x", "roi", "scales", "offset"}, [], list(nodes)
    while waiting:
        ready = next(n for n in waiting if all(i in produced or i.endswith(("_w", "_b")) for i in n.input))
        ordered.append(ready)
        produced.update(ready.output)
        waiting.remove(ready)
    return ordered


def _samples(count: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(count)]


def _regions(source: onnx.ModelProto):
    work = exposed_copy(load_model(source))
    layers = numbered_layers(work)
    return work, layers, find_regions(work, layers)


def _fused_ops(model, tmp_path) -> set[str]:
    """The op types onnxruntime runs after its graph optimizations (its optimized model, saved)."""
    path, optimized = tmp_path / "model.onnx", tmp_path / "optimized.onnx"
    save_model(model, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(str(optimized)).graph.node}


def test_regions_are_the_connected_int8_ops_around_convs_split_by_ops_without_int8_kernels():
    work, layers, regions = _regions(_detector())
    names = [{work.graph.nodes[i].name for i in region.nodes} for region in regions]
    assert names == [
        {"conv1", "sigmoid1", "silu1", "conv2", "residual", "pool"},
        {"conv3", "up1", "up2", "concat", "conv4", "head"},
    ]
    assert [region.first for region in regions] == ["conv1", "conv3"]
    # The first region's activations: its input, conv1's output, the SiLU's two, conv2's, the sum and the pooled.
    assert region_tensors(work, regions[0], layers) == ["x", "c1", "g1", "m1", "c2", "a1", "p1"]
    # Pooling and Resize only move values: their outputs share their input's scale, so onnxruntime drops the pair.
    assert shared_ranges(work, regions) == {"p1": "a1", "u1": "c3", "u2": "c3"}


def test_every_region_in_int8_runs_on_onnxruntimes_int8_kernels_and_keeps_the_function(tmp_path):
    samples = _samples(16)
    model, result = apply("quant:measure=false", _detector(), data=samples)
    assert result.changed and result.stats["layers_quantized"] == 4
    assert any(note.startswith("int8 regions: 2 ") for note in result.notes)
    assert all("in int8 region" in note for note in result.notes if note.startswith("Conv "))
    fused = _fused_ops(model, tmp_path)
    assert {"QLinearConv", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat"} <= fused
    # Every op in int8 but the last Add: the model's output keeps float precision.
    assert "Conv" not in fused and "Sigmoid" not in fused and "Concat" not in fused
    # uint8 activations calibrated on 12 samples, int8 per-channel weights: judged on the 4 held out.
    assert held_out_cosine(_detector(), model, samples) > 0.99


def test_regions_false_keeps_the_per_layer_type_plan():
    model, result = apply("quant:measure=false:regions=false", _detector(), data=_samples(16))
    assert result.changed and not any(note.startswith("int8 regions") for note in result.notes)
    assert "QLinearAdd" not in op_counts(model) and not any("in int8 region" in note for note in result.notes)


def test_without_data_there_is_no_region():
    _, result = apply("quant:measure=false", _detector())
    assert not any(note.startswith("int8 regions") for note in result.notes)


def test_measured_regions_are_recorded_and_replay_to_the_same_model(tmp_path):
    samples = _samples(16)
    context = PassContext(data=samples, timing=QUICK)
    model, records = PassManager(create_passes("quant"), context=context).run(load_model(_detector()))
    values = context.decisions.to_dict()["values"]
    assert "1:quant/int8 regions or layer types" in values
    assert {"1:quant/region 0 (6 ops, 2 Conv, from conv1) in float",
            "1:quant/region 1 (6 ops, 2 Conv, from conv3) in float"} <= values.keys()
    replayed, report = optimize(_detector(), "quant", data=samples, decisions={"decisions": {"values": values}})
    assert report.passes[0].stats.get("decisions_replayed", 0) >= 3
    save_model(model, tmp_path / "measured.onnx")
    save_model(replayed, tmp_path / "replayed.onnx")
    assert (tmp_path / "measured.onnx").read_bytes() == (tmp_path / "replayed.onnx").read_bytes()


@pytest.mark.parametrize("opset", [11, 12])
def test_a_model_below_opset_13_is_moved_to_13_for_per_channel_weights_and_says_so(opset, tmp_path):
    samples = _samples(16)
    model, result = apply("quant:measure=false", _detector(opset), data=samples)
    assert result.changed and model.graph.opset == 13
    assert result.stats["opset_from"] == opset and result.stats["opset_to"] == 13
    assert result.notes[0].startswith(f"moved from opset {opset} to 13")
    assert "QLinearConv" in _fused_ops(model, tmp_path)
    assert held_out_cosine(_detector(opset), model, samples) > 0.99


def _detector_with_a_function_the_converter_cannot_move(opset: int) -> onnx.ModelProto:
    """The detector with its Softplus inside a local function whose Unsqueeze and Squeeze take their axes from
    the caller: an op the conversion to opset 13 changes (axes become an input) with a value it cannot see."""
    axes = onnx.AttributeProto(name="axes", ref_attr_name="at", type=onnx.AttributeProto.INTS)
    body = [
        helper.make_node("Unsqueeze", ["a"], ["u"]), helper.make_node("Softplus", ["u"], ["v"]),
        helper.make_node("Squeeze", ["v"], ["b"]),
    ]
    for node in (body[0], body[2]):
        node.attribute.append(axes)
    function = helper.make_function("local", "SoftplusThere", ["a"], ["b"], body, [helper.make_opsetid("", opset)],
                                    attributes=["at"])
    model = _detector(opset)
    softplus = next(n for n in model.graph.node if n.op_type == "Softplus")
    softplus.op_type, softplus.domain = "SoftplusThere", "local"
    softplus.attribute.append(helper.make_attribute("at", [0]))
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [11, 12])
def test_where_the_converter_cannot_move_the_model_it_is_quantized_at_its_opset_per_tensor(opset, tmp_path):
    samples = _samples(16)
    source = _detector_with_a_function_the_converter_cannot_move(opset)
    model, result = apply("quant:measure=false", source, data=samples)
    assert result.changed and model.graph.opset == opset
    assert result.notes[0].startswith(f"kept at opset {opset}: onnx's version converter cannot move local function "
                                      "local:SoftplusThere to opset 13: its Unsqueeze takes axes from the caller")
    assert "one weight scale per tensor" in result.notes[1]
    convs = [node for node in model.graph.nodes if node.op == "QLinearConv"]
    assert len(convs) == 4 and all(node.inputs[4].values.size == 1 for node in convs)  # one weight scale each
    assert [f.name for f in model.to_proto().functions] == ["SoftplusThere"]
    assert held_out_cosine(source, model, _samples(8, seed=2)) > 0.99


def test_a_model_below_opset_13_with_nothing_per_channel_keeps_its_opset():
    """Dynamic int8 MatMuls (DynamicQuantizeMatMul keeps a scale per column itself) need no DequantizeLinear axis."""
    weight = constant("w", (np.random.default_rng(0).standard_normal((64, 32)) * 0.1).astype(np.float32))
    source = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [value_info("x", [4, 64])], [value_info("y", [4, 32])], [weight], 11,
    )
    model, result = apply("quant:measure=false", source)
    assert result.changed and model.graph.opset == 11 and "opset_to" not in result.stats


def test_a_scalar_constant_operand_joins_the_region_as_uint8_codes(tmp_path):
    """conv1 -> Mul by a 0-d constant -> conv2: the constant is stored as uint8 codes, and onnxruntime runs the Mul
    as QLinearMul."""
    rng = np.random.default_rng(0)
    (first, first_weights), (second, second_weights) = (
        _conv("conv1", "x", "c1", 8, 16, rng), _conv("conv2", "m", "y", 16, 8, rng)
    )
    source = make_model(
        [first, helper.make_node("Mul", ["c1", "half"], ["m"], name="scale"), second],
        [value_info("x", [1, 8, 16, 16])], [value_info("y", [1, 8, 16, 16])],
        [*first_weights, *second_weights, constant("half", np.array(0.5, np.float32))],
    )
    samples = _samples(16)
    model, result = apply("quant:measure=false", source, data=samples)
    assert result.changed and any(note.startswith("int8 regions: 1 ") for note in result.notes)
    assert "QLinearMul" in _fused_ops(model, tmp_path)
    assert held_out_cosine(source, model, samples) > 0.99


def _fitted_regions(samples: list[dict]):
    """The detector's regions all in int8 (static, per channel) with their builder, calibrated on `samples`'
    calibration part, its held-out part and outputs, and the worst held-out cosine all in int8."""
    work = exposed_copy(load_model(_detector()))
    layers = numbered_layers(work)
    regions = find_regions(work, layers)
    context = PassContext(data=samples)
    calibration = context.calibration
    names = [name for region in regions for name in region_tensors(work, region, layers)]
    activations = static_activations(work, names, calibration.split()[0], calibration, "minmax", 99.999,
                                     shared_ranges(work, regions))
    conv_format = LayerFormat("static", "qoperator", QuantSpec(8, True, True, "per-channel"))
    builder = RegionBuilder(
        work, regions, layers, {}, WeightQuantizer("rtn"), activations, contrib_ops=True,
        seven_bit_weights=context.runtime.capabilities.seven_bit_int8_weights,  # as quant builds for this CPU
    )
    plan = {index: conv_format for index in range(len(regions))}
    held_out = calibration.split()[1]
    reference = run_model(work, held_out, calibration)
    all_int8 = compare_outputs(reference, run_model(builder.build(plan), held_out, calibration)).min_cosine
    return builder, plan, calibration, held_out, reference, all_int8


def test_the_budget_leaves_the_fewest_first_or_last_tensors_float_that_fit_it():
    """fit_float_ends against three budgets: one the int8 regions meet, one only float meets, one in between."""
    builder, plan, calibration, held_out, reference, all_int8 = _fitted_regions(_samples(16))
    lenient, line = fit_float_ends(builder, plan, Budget({"cosine": 1 - all_int8 + 1e-6}), calibration)
    assert lenient == frozenset() and line == ""
    everything, line = fit_float_ends(builder, plan, Budget({"cosine": 0.0}), calibration)
    assert everything == frozenset(builder.tensors(plan)) and line.startswith("no region fits")
    between = Budget({"cosine": (1 - all_int8) / 2})
    floated, line = fit_float_ends(builder, plan, between, calibration)
    tensors, count = builder.tensors(plan), len(floated)
    assert 0 < count < len(tensors)
    end = "first" if floated == frozenset(tensors[:count]) else "last"
    assert end == "first" or floated == frozenset(tensors[len(tensors) - count:])
    assert line.startswith(f"the {end} {count} of the {len(tensors)} tensors")
    outputs = run_model(builder.build(plan, floated), held_out, calibration)
    assert compare_outputs(reference, outputs).min_cosine >= 1 - (1 - all_int8) / 2


def test_where_the_first_tensors_lose_the_most_they_are_the_ones_left_float():
    """Inputs with a rare spike make the first activations' uint8 steps coarse: leaving the first tensors float
    meets a budget that leaving as many of the last ones float does not."""
    builder, plan, calibration, held_out, reference, all_int8 = _fitted_regions(_spiked_samples())
    tensors = builder.tensors(plan)
    budget = Budget({"cosine": (1 - all_int8) / 4})
    floated, line = fit_float_ends(builder, plan, budget, calibration)
    assert line.startswith("the first ") and floated == frozenset(tensors[: len(floated)])
    for end, fits in ((floated, True), (frozenset(tensors[len(tensors) - len(floated):]), False)):
        outputs = run_model(builder.build(plan, end), held_out, calibration)
        assert budget.fits(budget.losses(reference, outputs, held_out)) == fits


def test_regions_that_fit_the_budget_spare_the_per_layer_fit_of_the_plan_they_replace():
    """With an error budget, the regions fit it themselves (their first tensors float here): no layer's
    sensitivity is measured alone, and the held-out error keeps within the budget."""
    samples = _spiked_samples()
    min_cosine = 1 - (1 - _fitted_regions(samples)[-1]) / 4
    source = _detector()
    model, result = apply(f"quant:measure=false:min_cosine={min_cosine}", source, data=samples)
    assert any(note.startswith("the first ") and "left float to meet" in note for note in result.notes)
    assert not any("most sensitive" in note for note in result.notes)
    assert all(layer.error is None for layer in result.layers)
    assert held_out_cosine(source, model, PassContext(data=samples).calibration.split()[1]) >= min_cosine


def _spiked_samples() -> list[dict]:
    samples = _samples(16)
    for sample in samples:
        sample["x"][0, 0, 0, 0] = 400.0
    return samples


