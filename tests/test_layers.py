"""The layer model (ir/layers.py): weight axes, bias, the matrix view against onnxruntime's outputs, cost, and which
layers each pass selects from it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_checks import constant, make_model, value_info
from onnx import TensorProto, helper

from onnxforge.backends import BackendOptions, get_backend
from onnxforge.ir import infer_shapes, load_model
from onnxforge.ir.layers import LayerCost, as_layer, describe_change, layer_costs
from onnxforge.passes.layers import find_layers, half_precision_note

RNG = np.random.default_rng(0)


def weights(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def one_layer(op: str, x_shape: list[int], weight: np.ndarray, bias: np.ndarray | None = None, **attrs):
    """A model of one `op` node reading x and the constant weight w (and bias b)."""
    inputs = ["x", "w", "b"] if bias is not None else ["x", "w"]
    initializers = [constant("w", weight)] + ([constant("b", bias)] if bias is not None else [])
    proto = make_model(
        [helper.make_node(op, inputs, ["y"], name="layer", **attrs)],
        [value_info("x", x_shape)],
        [value_info("y", None)],
        initializers,
    )
    model = load_model(onnx.shape_inference.infer_shapes(proto))
    infer_shapes(model)
    return model


LINEAR_LAYERS = {
    "matmul": lambda: one_layer("MatMul", [2, 5, 6], weights(6, 4)),
    "gemm": lambda: one_layer("Gemm", [5, 6], weights(6, 4), weights(4)),
    "gemm_transB": lambda: one_layer("Gemm", [5, 6], weights(4, 6), weights(4), transB=1),
    "conv": lambda: one_layer("Conv", [2, 3, 9, 8], weights(5, 3, 3, 2), weights(5), strides=[2, 1], pads=[1, 0, 1, 1]),
    "conv_dilated": lambda: one_layer("Conv", [1, 3, 9, 9], weights(4, 3, 3, 3), dilations=[2, 1]),
    "conv_transpose": lambda: one_layer(
        "ConvTranspose", [2, 3, 4, 5], weights(3, 4, 3, 2), weights(4), strides=[2, 2], pads=[1, 0, 0, 1]
    ),
}


@pytest.mark.parametrize("name", LINEAR_LAYERS)
def test_input_rows_times_the_matrix_plus_the_bias_give_the_output_rows(name):
    model = LINEAR_LAYERS[name]()
    [node] = model.graph.nodes
    layer = as_layer(node)
    x = RNG.standard_normal(node.inputs[0].shape).astype(np.float32)
    output = get_backend("ort").prepare(model, BackendOptions(graph_optimization="disable")).run({"x": x})["y"]
    y = layer.output_rows(output)
    product = layer.input_rows(x, np.arange(len(y)), output.shape) @ layer.matrix()
    if layer.bias is not None:
        holder, index = layer.bias
        product += holder.inputs[index].values
    assert np.allclose(product, y, atol=1e-4), name
    assert np.array_equal(layer.stored(layer.matrix()), layer.weight.values)
    # The rows of the matrix that read one input channel are those that see it in the input rows.
    silenced = x.copy()
    np.moveaxis(silenced, 1 if node.op in ("Conv", "ConvTranspose") else -1, 0)[2] = 0  # a view: channel 2 is 0
    rows = [layer.input_rows(value, np.arange(len(y)), output.shape) for value in (x, silenced)]
    changed = rows[0] != rows[1]
    assert set(np.flatnonzero(changed.any(0))) == set(layer.matrix_rows(np.array([2])))


@pytest.mark.parametrize(
    ("name", "out_channels", "in_channels"),
    [("matmul", 4, 6), ("gemm", 4, 6), ("gemm_transB", 4, 6), ("conv", 5, 3), ("conv_transpose", 4, 3)],
)
def test_the_axes_of_the_weight_hold_the_output_and_input_channels(name, out_channels, in_channels):
    layer = as_layer(LINEAR_LAYERS[name]().graph.nodes[0])
    assert layer.weight.shape[layer.out_axis] == out_channels and layer.weight.shape[layer.in_axis] == in_channels
    assert layer.node.outputs[0].shape[layer.channel_axis] == out_channels


def test_an_embedding_and_recurrent_layers_read_their_weights_by_rows():
    table, w, r = weights(10, 8), weights(1, 9, 8), weights(1, 9, 3)  # 3 gates of 3
    proto = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("GRU", ["e", "w", "r"], ["h"], hidden_size=3, name="gru"),
        ],
        [value_info("ids", [5, 1], TensorProto.INT64)],
        [value_info("h", None)],
        [constant("table", table), constant("w", w), constant("r", r)],
    )
    embed, gru = (as_layer(node) for node in load_model(proto).graph.nodes)
    assert (embed.weight_input, embed.out_axis, embed.in_axis, embed.activation.name) == (0, 0, 1, "ids")
    assert (gru.weight_input, gru.out_axis, gru.in_axis, gru.activation.name) == (1, 1, 2, "e")
    assert embed.bias is None and gru.bias is None


def matmul_then(reader: str, bias_shape: list[int], readers: int = 1):
    """x @ w then `reader` (Add, or onnxruntime's BiasGelu) with a constant of `bias_shape`; `readers` nodes read
    the MatMul's output."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")]
    domain = "com.microsoft" if reader != "Add" else ""
    nodes.append(helper.make_node(reader, ["h", "b"], ["y"], domain=domain))
    nodes += [helper.make_node("Relu", ["h"], ["z"])] * (readers - 1)
    outputs = [value_info("y", None)] + [value_info("z", None)] * (readers - 1)
    return load_model(make_model(nodes, [value_info("x", [3, 6])], outputs, [constant("w", weights(6, 4)),
                                                                          constant("b", weights(*bias_shape))]))


def test_the_bias_is_the_layers_own_or_the_constant_its_one_reader_adds():
    conv = as_layer(LINEAR_LAYERS["conv"]().graph.nodes[0])
    assert conv.bias == (conv.node, 2)
    assert as_layer(LINEAR_LAYERS["conv_dilated"]().graph.nodes[0]).bias is None
    for reader in ("Add", "BiasGelu"):
        model = matmul_then(reader, [4])
        layer = as_layer(model.graph.nodes[0])
        assert layer.bias == (model.graph.nodes[1], 1)
    assert as_layer(matmul_then("Add", [3, 4]).graph.nodes[0]).bias is None  # not one value per output channel
    assert as_layer(matmul_then("Add", [4], readers=2).graph.nodes[0]).bias is None  # the output is read elsewhere


def test_nodes_without_a_constant_weight_are_not_layers():
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "x"], ["square"]),
            helper.make_node("MatMul", ["x", "v"], ["vector"]),
            helper.make_node("Gather", ["x", "index"], ["row"]),
            helper.make_node("Conv", ["image", "k"], ["custom"], domain="example.custom"),
        ],
        [value_info("x", [4, 4]), value_info("image", [1, 1, 4, 4])],
        [value_info(name, None) for name in ("square", "vector", "row", "custom")],
        [constant("v", weights(4)), constant("index", np.array([1], np.int64)), constant("k", weights(1, 1, 3, 3))],
    )
    assert [as_layer(node) for node in load_model(proto).graph.nodes] == [None] * 4


def test_the_cost_counts_weights_bias_and_multiply_accumulates():
    conv = as_layer(LINEAR_LAYERS["conv"]().graph.nodes[0])  # y [2, 5, 5, 8]: every output reads 3 x 3 x 2 inputs
    assert conv.cost == LayerCost(5 * 3 * 3 * 2 + 5, 2 * 5 * 5 * 8 * 18)
    transposed = as_layer(LINEAR_LAYERS["conv_transpose"]().graph.nodes[0])  # every input meets 4 x 3 x 2 weights
    assert transposed.cost == LayerCost(3 * 4 * 3 * 2 + 4, 2 * 3 * 4 * 5 * 24)
    gemm = as_layer(LINEAR_LAYERS["gemm_transB"]().graph.nodes[0])
    assert gemm.cost == LayerCost(4 * 6 + 4, 5 * 4 * 6)
    assert describe_change(LayerCost(100, 4_000_000), LayerCost(50, 1_000_000)) == (
        "params 100 -> 50, MACs 4.0M -> 1.0M (4.00x fewer)"
    )


def test_each_pass_selects_its_layers_from_the_one_model():
    """find_layers (quant, lowrank, sparsity) takes float32 layers it can rewrite; layer_costs counts every Conv,
    ConvTranspose, MatMul and Gemm; half_precision_note names the float16 layers find_layers leaves."""
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "w2"], ["a"], name="plain"),
            helper.make_node("MatMul", ["x3", "w3"], ["b"], name="batched"),
            helper.make_node("Gemm", ["xt", "w2"], ["c"], name="transposed", transA=1),
            helper.make_node("ConvTranspose", ["image", "k"], ["d"], name="up"),
            helper.make_node("MatMul", ["half", "w16"], ["e"], name="half"),
        ],
        [value_info("x", [4, 4]), value_info("x3", [2, 4, 4]), value_info("xt", [4, 4]),
         value_info("image", [1, 2, 4, 4]), value_info("half", [4, 4], TensorProto.FLOAT16)],
        [value_info(name, None) for name in "abcde"],
        [constant("w2", weights(4, 4)), constant("w3", weights(2, 4, 4)), constant("k", weights(2, 3, 3, 3)),
         constant("w16", weights(4, 4).astype(np.float16))],
    )
    model = load_model(proto)
    assert [layer.name for layer in find_layers(model.graph)] == ["plain"]
    assert len(layer_costs(model.graph)) == 5
    assert half_precision_note(model.graph, "quant") == [
        "1 float16/bfloat16 layers left as they are (half): quant rewrites float32 weights"
    ]
