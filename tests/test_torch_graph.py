"""onnxforge.distill.torch_graph: a model evaluated by torch matches onnxruntime on fresh random inputs, trains,
and writes its learned weights back into the same graph (same nodes, names, opsets; only initializer values).

Models: PyTorch exports (benchmarks/torch_models.py's residual CNN and transformer encoder, small), the same after
`cleanup,fuse` (onnxruntime contrib ops) and after `quant` (QDQ, MatMulNBits, GatherBlockQuantized), and graphs
built with onnx.helper for the less common ops and attribute forms. onnxruntime runs with its graph optimizations
off for op semantics, with them on for the written-back models (what deployment runs).
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.ir import Model, load_model

torch = pytest.importorskip("torch")

from onnxforge.distill.op_table import TorchConversionError  # noqa: E402
from onnxforge.distill.torch_graph import TorchGraph, write_back  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from model_builders import BertLike  # noqa: E402
from torch_models import residual_cnn_module, transformer_encoder_module  # noqa: E402

RTOL = 1e-4  # float32: error relative to each output's largest magnitude
F, I64 = TensorProto.FLOAT, TensorProto.INT64
MS = "com.microsoft"


# --- helpers ---------------------------------------------------------------------------------------------


def _onnxruntime(model: Model | onnx.ModelProto, feeds: dict, optimized: bool = False) -> list[np.ndarray]:
    proto = model.to_proto() if isinstance(model, Model) else model
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch(module: TorchGraph, feeds: dict) -> list[np.ndarray]:
    with torch.no_grad():
        return [value.float().numpy() if value.is_floating_point() else value.numpy() for value in
                module(feeds).values()]


def _assert_close(expected: list[np.ndarray], actual: list[np.ndarray], rtol: float = RTOL) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want.shape == got.shape
        if want.dtype.kind in "fc":
            scale = max(float(np.abs(want).max()), 1e-6)
            np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)
        else:
            np.testing.assert_array_equal(got, want)


def _matches_onnxruntime(model: Model | onnx.ModelProto, feeds: dict, rtol: float = RTOL) -> TorchGraph:
    ir = model if isinstance(model, Model) else load_model(model)
    module = TorchGraph(ir)
    _assert_close(_onnxruntime(ir, feeds), _torch(module, feeds), rtol)
    return module


def _export(module, inputs: tuple, names: list[str], dynamic: dict | None = None, **options) -> onnx.ModelProto:
    buffer = io.BytesIO()
    # Not under no_grad: nn.TransformerEncoder would take its fused fast path, which does not export.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, buffer, input_names=names, output_names=["y"], opset_version=17,
                          dynamo=False, dynamic_axes=dynamic, **options)
    return onnx.load_from_string(buffer.getvalue())


def _random(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _graph(nodes, feeds: dict, outputs: dict, initializers: dict | None = None, opset: int = 17,
           contrib: bool = False) -> onnx.ModelProto:
    """A model of `nodes` reading `feeds` (name -> example array) and giving `outputs` (name -> element type)."""
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for n, a in feeds.items()]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()]
    inits = [a if isinstance(a, onnx.TensorProto) else numpy_helper.from_array(np.asarray(a), n)
             for n, a in (initializers or {}).items()]
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if contrib else [])
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outs, inits), opset_imports=opsets)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


# --- exported models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    """The residual CNN (BatchNorm folded by the exporter) on 32x32 images, batch dynamic."""
    return _export(residual_cnn_module(), (torch.randn(1, 3, 32, 32),), ["x"], {"x": {0: "batch"}})


@pytest.fixture(scope="module")
def transformer() -> onnx.ModelProto:
    """A 2-layer nn.TransformerEncoder of width 32, 8 tokens (static shapes: the fusions need them)."""
    return _export(transformer_encoder_module(2, 32, 4, 64), (torch.randn(1, 8, 32),), ["x"])


@pytest.fixture(scope="module")
def fused_transformer(transformer) -> Model:
    return optimize(transformer, "cleanup,fuse")[0]


@pytest.fixture(scope="module")
def static_qdq_cnn(cnn) -> Model:
    data = [{"x": _random(1, 3, 32, 32, seed=i)} for i in range(2)]
    return optimize(cnn, "cleanup,fuse,quant:measure=false:mode=static:format=qdq", data=data, seed=0)[0]


def _op_types(model: Model) -> set[str]:
    return {node.op for node in model.graph.nodes}


def test_exported_cnn_with_dynamic_batch_matches_onnxruntime(cnn):
    module = _matches_onnxruntime(cnn, {"x": _random(3, 3, 32, 32)})
    assert len(module.initializer_parameters()) == 22  # 10 convs and the Linear: weights and biases


def test_exported_cnn_with_batchnorm_nodes_matches_onnxruntime_and_keeps_statistics_fixed():
    model = _export(residual_cnn_module(), (torch.randn(1, 3, 32, 32),), ["x"], do_constant_folding=False)
    module = _matches_onnxruntime(model, {"x": _random(1, 3, 32, 32)})
    statistics = {i for n in model.graph.node if n.op_type == "BatchNormalization" for i in n.input[3:]}
    assert statistics and not statistics & module.initializer_parameters().keys()


def test_exported_transformer_matches_onnxruntime_with_and_without_dynamic_axes(transformer):
    _matches_onnxruntime(transformer, {"x": _random(1, 8, 32)})
    # TorchScript bakes nn.MultiheadAttention's sequence length into the graph: only the batch is dynamic.
    dynamic = _export(transformer_encoder_module(2, 32, 4, 64), (torch.randn(1, 8, 32),), ["x"], {"x": {0: "b"}})
    _matches_onnxruntime(dynamic, {"x": _random(3, 8, 32)})


def test_fused_models_with_contrib_ops_match_onnxruntime(cnn, fused_transformer):
    assert {"Attention", "SkipLayerNormalization"} <= _op_types(fused_transformer)
    _matches_onnxruntime(fused_transformer, {"x": _random(1, 8, 32, seed=1)})
    _matches_onnxruntime(optimize(cnn, "cleanup,fuse")[0], {"x": _random(2, 3, 32, 32, seed=1)})


@pytest.mark.slow
def test_fused_and_int4_bert_with_masked_attention_match_onnxruntime():
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 32, (1, 16)), torch.ones(1, 16, dtype=torch.int64)
    axes = {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}
    exported = _export(BertLike().eval(), (ids, mask), ["ids", "mask"], axes)
    padded = np.ones((2, 10), np.int64)
    padded[0, 6:] = 0
    feeds = {"ids": np.random.default_rng(0).integers(0, 32, (2, 10)), "mask": padded}
    fused = optimize(exported, "cleanup,fuse")[0]
    assert {"Attention", "BiasGelu", "SkipLayerNormalization"} <= _op_types(fused)
    _matches_onnxruntime(fused, feeds)
    quantized = optimize(exported, "cleanup,fuse,quant:measure=false:bits=4", seed=0)[0]
    assert {"GatherBlockQuantized", "MatMulNBits"} <= _op_types(quantized)
    for node in quantized.graph.nodes:
        if node.op == "MatMulNBits":
            node.attrs["accuracy_level"] = 0  # float activations, as the torch module computes
    _matches_onnxruntime(quantized, feeds)


def test_static_qdq_model_matches_onnxruntime(static_qdq_cnn):
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(static_qdq_cnn)
    feeds = {"x": _random(2, 3, 32, 32, seed=2)}
    [want], [got] = _onnxruntime(static_qdq_cnn, feeds), _torch(TorchGraph(static_qdq_cnn), feeds)
    # The output is DequantizeLinear(codes) + bias: a float convolution summed in another order can round a value
    # that sits on a code boundary the other way, one code step, on a few elements (which ones depends on the
    # weights' grid: 7 bits on a CPU without VNNI).
    dequantize = static_qdq_cnn.graph.outputs[0].inputs[0].inputs[0].inputs[0]
    step = float(dequantize.inputs[1].values)
    off = np.abs(got - want)
    assert off.max() <= 1.01 * step and (off > 1e-6 * step).mean() < 0.05


def test_dynamic_qdq_model_matches_onnxruntime(fused_transformer):
    quantized = optimize(fused_transformer, "quant:measure=false:format=qdq", seed=0)[0]
    assert "DynamicQuantizeLinear" in _op_types(quantized)
    _matches_onnxruntime(quantized, {"x": _random(1, 8, 32, seed=3)})


def test_int4_weight_only_model_matches_onnxruntime_with_exact_kernels(fused_transformer):
    quantized = optimize(fused_transformer, "quant:measure=false:bits=4", seed=0)[0]
    assert {"MatMulNBits", "MultiHeadAttention"} <= _op_types(quantized)
    feeds = {"x": _random(1, 8, 32, seed=4)}
    module = TorchGraph(quantized)
    # accuracy_level=4 lets onnxruntime quantize the activations to int8 too: close, not equal.
    _assert_close(_onnxruntime(quantized, feeds), _torch(module, feeds), rtol=3e-2)
    for node in quantized.graph.nodes:
        if node.op == "MatMulNBits":
            node.attrs["accuracy_level"] = 0
    _assert_close(_onnxruntime(quantized, feeds), _torch(module, feeds))
    nbits = [n for n in quantized.graph.nodes if n.op == "MatMulNBits"]
    trained = module.initializer_parameters().keys()
    assert {n.inputs[1].name for n in nbits} == module.code_layouts().keys()  # the packed codes
    assert {n.inputs[2].name for n in nbits} <= trained  # the scales
    assert not {n.inputs[3].name for n in nbits if len(n.inputs) > 3} & trained  # the zero points


# --- graphs of less common ops and attribute forms ----------------------------------------------------------

N = helper.make_node
BIG = np.iinfo(np.int64).max

CASES = {
    "slice_gather_expand_where": _graph(
        [
            N("Slice", ["x", "s_start", "s_end", "s_axes", "s_steps"], ["sliced"]),
            N("Slice", ["x", "t_start", "t_end", "t_axes"], ["sliced_2"]),
            N("Gather", ["x", "indices"], ["gathered"], axis=2),
            N("GatherElements", ["x", "element_indices"], ["elements"], axis=1),
            N("Expand", ["row", "e_shape"], ["expanded"]),
            N("Greater", ["x", "zero"], ["positive"]),
            N("Where", ["positive", "x", "row"], ["chosen"]),
        ],
        {"x": _random(2, 3, 8)},
        {"sliced": F, "sliced_2": F, "gathered": F, "elements": F, "expanded": F, "chosen": F},
        {"s_start": _ints(-1), "s_end": _ints(-100), "s_axes": _ints(2), "s_steps": _ints(-3),
         "t_start": _ints(1, 0), "t_end": _ints(BIG, -1), "t_axes": _ints(0, 1),
         "indices": _ints(0, -1, 3).reshape(1, 3), "element_indices": np.zeros((2, 2, 8), np.int64),
         "row": _random(8, seed=1), "e_shape": _ints(2, 1, 8), "zero": np.float32(0)},
    ),
    "reductions_and_search": _graph(
        [
            N("ReduceMean", ["x", "last"], ["mean"], keepdims=0),
            N("ReduceSum", ["x"], ["total"]),
            N("ReduceMax", ["x", "outer"], ["largest"]),
            N("ReduceL2", ["x", "middle"], ["norm"], keepdims=0),
            N("ReduceMin", ["x"], ["unreduced"], noop_with_empty_axes=1),
            N("ArgMax", ["x"], ["argmax"], axis=1, select_last_index=1),
            N("TopK", ["x", "k"], ["top_values", "top_indices"], axis=-1),
            N("CumSum", ["x", "axis"], ["cumulative"], exclusive=1, reverse=1),
            N("Trilu", ["x", "diagonal"], ["lower"], upper=0),
        ],
        {"x": np.round(_random(2, 3, 4), 1)},  # ties for ArgMax's select_last_index
        {"mean": F, "total": F, "largest": F, "norm": F, "unreduced": F, "argmax": I64, "top_values": F,
         "top_indices": I64, "cumulative": F, "lower": F},
        {"last": _ints(-1), "outer": _ints(0, 2), "middle": _ints(1), "k": _ints(2), "axis": _ints(1),
         "diagonal": np.int64(1)},
        opset=18,
    ),
    "resize_and_pad": _graph(
        [
            N("Resize", ["x", "", "up"], ["nearest"], mode="nearest", coordinate_transformation_mode="asymmetric",
              nearest_mode="floor"),
            N("Resize", ["x", "", "", "sizes"], ["linear"], mode="linear"),
            N("Resize", ["x", "", "", "sizes"], ["corners"], mode="linear",
              coordinate_transformation_mode="align_corners"),
            N("Resize", ["x", "", "down"], ["halved"], mode="nearest", nearest_mode="round_prefer_ceil",
              coordinate_transformation_mode="pytorch_half_pixel"),
            N("Resize", ["x", "", "two"], ["axes"], mode="linear", axes=[2, 3]),
            N("Pad", ["x", "reflect_pads"], ["reflected"], mode="reflect"),
            N("Pad", ["x", "constant_pads", "fill"], ["filled"]),
            N("Pad", ["x", "edge_pads", "", "pad_axes"], ["edged"], mode="edge"),
            N("Pad", ["x", "edge_pads", "", "pad_axes"], ["wrapped"], mode="wrap"),
        ],
        {"x": _random(1, 2, 4, 5)},
        {"nearest": F, "linear": F, "corners": F, "halved": F, "axes": F, "reflected": F, "filled": F,
         "edged": F, "wrapped": F},
        {"up": np.array([1, 1, 2, 1.5], np.float32), "sizes": _ints(1, 2, 7, 3),
         "down": np.array([1, 1, 0.5, 0.6], np.float32), "two": np.array([2, 2], np.float32),
         "reflect_pads": _ints(0, 0, 1, 2, 0, 0, 2, 1), "constant_pads": _ints(0, 1, -1, 0, 0, 0, 1, 2),
         "fill": np.float32(1.5), "edge_pads": _ints(2, 1, 0, 3), "pad_axes": _ints(2, 3)},
        opset=19,
    ),
    "split_einsum_shapes": _graph(
        [
            N("Split", ["x"], ["part_1", "part_2", "part_3"], axis=2, num_outputs=3),
            N("Split", ["x", "sizes"], ["first", "rest"], axis=1),
            N("Einsum", ["x", "y"], ["product"], equation="bij, bjk -> bik"),
            N("Shape", ["x"], ["middle_shape"], start=1, end=-1),
            N("ConstantOfShape", ["middle_shape"], ["sevens"], value=numpy_helper.from_array(_ints(7))),
            N("Range", ["zero", "five", "one"], ["counted"]),
            N("Tile", ["x", "repeats"], ["tiled"]),
            N("Flatten", ["x"], ["flat"], axis=2),
            N("Unsqueeze", ["x", "new_axes"], ["unsqueezed"]),
            N("Squeeze", ["unsqueezed", "new_axes"], ["squeezed"]),
            N("Transpose", ["x"], ["reversed"]),
            N("Size", ["x"], ["size"]),
            N("DepthToSpace", ["x4"], ["spread"], blocksize=2, mode="CRD"),
            N("SpaceToDepth", ["x4"], ["stacked"], blocksize=2),
        ],
        {"x": _random(2, 4, 5), "y": _random(2, 5, 3, seed=1), "x4": _random(1, 8, 2, 4, seed=2)},
        {"part_1": F, "part_2": F, "part_3": F, "first": F, "rest": F, "product": F, "middle_shape": I64,
         "sevens": I64, "counted": I64, "tiled": F, "flat": F, "squeezed": F, "reversed": F, "size": I64,
         "spread": F, "stacked": F},
        {"sizes": _ints(1, 3), "zero": np.int64(0), "five": np.int64(5), "one": np.int64(1),
         "repeats": _ints(1, 2, 1), "new_axes": _ints(0, -1)},
        opset=18,
    ),
    "convolution_and_pooling": _graph(
        [
            N("Conv", ["x", "w", "b"], ["same"], auto_pad="SAME_UPPER", strides=[2, 2], group=2),
            N("Conv", ["x", "w"], ["asymmetric"], pads=[0, 1, 2, 1], group=2, dilations=[1, 2]),
            N("ConvTranspose", ["x", "wt", "bt"], ["up"], strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1]),
            N("ConvTranspose", ["x", "wt"], ["up_same"], strides=[2, 1], auto_pad="SAME_LOWER"),
            N("MaxPool", ["x"], ["max_ceil"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
            N("MaxPool", ["x"], ["max_padded"], kernel_shape=[2, 2], pads=[1, 0, 0, 1]),
            N("AveragePool", ["x"], ["mean_excluding"], kernel_shape=[3, 2], pads=[0, 1, 1, 0]),
            N("AveragePool", ["x"], ["mean_including"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
              count_include_pad=1, ceil_mode=1),
            N("GlobalMaxPool", ["x"], ["global_max"]),
            N("InstanceNormalization", ["x", "scale", "shift"], ["instance"]),
            N("BatchNormalization", ["x", "scale", "shift", "mean", "var"], ["batch"]),
        ],
        {"x": _random(2, 4, 7, 6)},
        {"same": F, "asymmetric": F, "up": F, "up_same": F, "max_ceil": F, "max_padded": F,
         "mean_excluding": F, "mean_including": F, "global_max": F, "instance": F, "batch": F},
        {"w": _random(6, 2, 3, 3, seed=1), "b": _random(6, seed=2), "wt": _random(4, 3, 3, 2, seed=3),
         "bt": _random(3, seed=4), "scale": _random(4, seed=5), "shift": _random(4, seed=6),
         "mean": _random(4, seed=7), "var": np.abs(_random(4, seed=8)) + 0.5},
    ),
    "activations_and_linear": _graph(
        [
            N("Clip", ["x", "low"], ["clipped"]),
            N("LeakyRelu", ["x"], ["leaky"], alpha=0.2),
            N("Elu", ["x"], ["elu"], alpha=0.5),
            N("HardSigmoid", ["x"], ["hard_sigmoid"], alpha=0.3, beta=0.4),
            N("HardSwish", ["x"], ["hard_swish"]),
            N("Gelu", ["x"], ["gelu"], approximate="tanh"),
            N("Softmax", ["x"], ["softmax"], axis=0),
            N("LogSoftmax", ["x"], ["log_softmax"]),
            N("Erf", ["x"], ["erf"]),
            N("PRelu", ["x", "slope"], ["prelu"]),
            N("Gemm", ["x", "w", "c"], ["gemm"], alpha=0.5, beta=2.0, transA=1, transB=1),
            N("Max", ["x", "slope", "low"], ["largest"]),
            N("Mean", ["x", "slope"], ["average"]),
            N("Pow", ["x", "two"], ["squared"]),
            N("Div", ["x", "slope"], ["divided"]),
            N("LayerNormalization", ["x", "slope", "shift"], ["normalized"], axis=-1, epsilon=1e-3),
        ],
        {"x": _random(4, 5)},
        {"clipped": F, "leaky": F, "elu": F, "hard_sigmoid": F, "hard_swish": F, "gelu": F, "softmax": F,
         "log_softmax": F, "erf": F, "prelu": F, "gemm": F, "largest": F, "average": F, "squared": F,
         "divided": F, "normalized": F},
        {"low": np.float32(-0.5), "slope": _random(5, seed=1), "w": _random(3, 4, seed=2),
         "c": _random(3, seed=3), "shift": _random(5, seed=4), "two": np.float32(2)},
        opset=20,
    ),
    "opset_9_attribute_forms": _graph(
        [
            N("Slice", ["x"], ["sliced"], starts=[1, -3], ends=[BIG, -1], axes=[1, 2]),
            N("Unsqueeze", ["x"], ["unsqueezed"], axes=[0]),
            N("Squeeze", ["unsqueezed"], ["squeezed"], axes=[0]),
            N("Clip", ["x"], ["clipped"], min=-0.3, max=0.4),
            N("Pad", ["x"], ["padded"], pads=[0, 1, 0, 0, 0, 2], value=2.0),
            N("Softmax", ["x"], ["flattened_softmax"]),  # axis 1 over the flattened trailing axes
            N("Upsample", ["x4", "scales"], ["upsampled"], mode="nearest"),
            N("Split", ["x"], ["a", "b"], axis=2, split=[1, 3]),
            N("ReduceMean", ["x"], ["mean"], axes=[1, 2]),
        ],
        {"x": _random(2, 3, 4), "x4": _random(1, 2, 3, 3, seed=1)},
        {"sliced": F, "squeezed": F, "clipped": F, "padded": F, "flattened_softmax": F, "upsampled": F,
         "a": F, "b": F, "mean": F},
        {"scales": np.array([1, 1, 2, 3], np.float32)},
        opset=9,
    ),
    "quantization_opset_21": _graph(
        [
            N("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_codes"], axis=1),
            N("DequantizeLinear", ["x_codes", "x_scale", "x_zero"], ["x_back"], axis=1),
            N("DequantizeLinear", ["w_codes", "w_scale"], ["w"], axis=0, block_size=2),
            N("MatMul", ["x_back", "w"], ["product"]),
            N("DynamicQuantizeLinear", ["product"], ["p_codes", "p_scale", "p_zero"]),
            N("DequantizeLinear", ["p_codes", "p_scale", "p_zero"], ["p_back"]),
            N("QuantizeLinear", ["x", "u_scale"], ["u_codes"]),
            N("DequantizeLinear", ["u_codes", "u_scale"], ["u_back"]),
        ],
        {"x": _random(3, 4)},
        {"x_back": F, "product": F, "p_back": F, "u_back": F},
        {"x_scale": np.array([0.01, 0.02, 0.03, 0.05], np.float32), "x_zero": np.array([0, 3, -2, 1], np.int8),
         "w_codes": helper.make_tensor("w_codes", TensorProto.INT4, [4, 3], [-8, 7, 1, 2, -3, 0, 5, -1, 4, 6, -7, 3]),
         "w_scale": np.array([[0.1, 0.2, 0.3], [0.05, 0.04, 0.03]], np.float32), "u_scale": np.float32(0.02)},
        opset=21,
    ),
    "opset_23": _graph(
        [
            N("Attention", ["q", "k", "v", "additive"], ["attended"], scale=0.4),
            N("Attention", ["q", "k", "v", "attends"], ["masked"], is_causal=1),
            N("RMSNormalization", ["q", "gamma"], ["rms"], epsilon=1e-4),
        ],
        {"q": _random(2, 3, 5, 4), "k": _random(2, 3, 6, 4, seed=1), "v": _random(2, 3, 6, 4, seed=2),
         "additive": _random(2, 1, 5, 6, seed=3)},
        {"attended": F, "masked": F, "rms": F},
        {"attends": np.array([[True] * 5 + [False]] * 5), "gamma": _random(4, seed=4)},
        opset=23,
    ),
    "contrib_ops": _graph(
        [
            N("FusedConv", ["image", "kernel", "kernel_bias", "image_sum"], ["fused_conv"], domain=MS,
              pads=[1, 1, 1, 1], activation="LeakyRelu", activation_params=[0.3]),
            N("FusedConv", ["image", "kernel"], ["clipped_conv"], domain=MS, activation="Clip",
              activation_params=[-0.5, 0.5], pads=[1, 1, 1, 1]),
            N("FusedMatMul", ["a", "b"], ["fused_matmul"], domain=MS, alpha=0.5, transA=1, transBatchB=1),
            N("Gelu", ["a"], ["gelu"], domain=MS),
            N("FastGelu", ["a", "bias3"], ["fast_gelu"], domain=MS),
            N("BiasGelu", ["a", "bias3"], ["bias_gelu"], domain=MS),
            N("QuickGelu", ["a"], ["quick_gelu"], domain=MS, alpha=1.5),
            N("SkipLayerNormalization", ["a", "skip", "gamma", "beta", "bias3"],
              ["skip_norm", "", "", "skip_sum"], domain=MS, epsilon=1e-5),
            N("SkipSimplifiedLayerNormalization", ["a", "skip", "gamma"], ["skip_rms", "", "", "rms_sum"], domain=MS,
              epsilon=1e-5),
            N("SimplifiedLayerNormalization", ["a", "gamma"], ["rms"], epsilon=1e-5),
        ],
        {"image": _random(1, 2, 5, 5), "image_sum": _random(1, 3, 5, 5, seed=1), "a": _random(2, 4, 3, seed=2),
         "skip": _random(2, 4, 3, seed=3)},
        {"fused_conv": F, "clipped_conv": F, "fused_matmul": F, "gelu": F, "fast_gelu": F, "bias_gelu": F,
         "quick_gelu": F, "skip_norm": F, "skip_sum": F, "skip_rms": F, "rms_sum": F, "rms": F},
        {"kernel": _random(3, 2, 3, 3, seed=4), "kernel_bias": _random(3, seed=5), "b": _random(4, 2, 5, seed=6),
         "bias3": _random(3, seed=7), "gamma": _random(3, seed=8), "beta": _random(3, seed=9)},
        contrib=True,
    ),
    "attention": _graph(
        [
            N("Attention", ["a", "qkv_weight", "qkv_bias", "", "", "attention_bias"], ["attended"], domain=MS,
              num_heads=2),
            N("MultiHeadAttention", ["a", "keys", "values", "mha_bias", "", "attention_bias_t"], ["cross"],
              domain=MS, num_heads=2, scale=0.3),
        ],
        {"a": _random(2, 5, 4), "keys": _random(2, 7, 4, seed=1), "values": _random(2, 7, 4, seed=2),
         "attention_bias": _random(2, 1, 5, 5, seed=3), "attention_bias_t": _random(1, 2, 5, 7, seed=4)},
        {"attended": F, "cross": F},
        {"qkv_weight": _random(4, 12, seed=5), "qkv_bias": _random(12, seed=6), "mha_bias": _random(12, seed=7)},
        contrib=True,
    ),
}


def _feeds_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Fresh random inputs of the declared shapes (other seeds than the example arrays)."""
    feeds = {}
    for index, value in enumerate(model.graph.input):
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = _random(*shape, seed=100 + index)
    return feeds


CASES_FEEDS = {name: _feeds_of(model) for name, model in CASES.items()}
CASES_FEEDS["reductions_and_search"]["x"] = np.round(CASES_FEEDS["reductions_and_search"]["x"], 1)


@pytest.mark.parametrize("case", CASES)
def test_graph_of_ops_matches_onnxruntime(case):
    _matches_onnxruntime(CASES[case], CASES_FEEDS[case])


def test_per_channel_dequantize_scales_and_weight_codes_train_and_zero_points_do_not():
    module = TorchGraph(load_model(CASES["quantization_opset_21"]))
    assert set(module.initializer_parameters()) == {"x_scale", "w_scale", "w_codes"}
    assert set(module.code_layouts()) == {"w_codes"}
    assert {"x_zero", "u_scale"}.isdisjoint(module.parameter_names().values())


# --- training and writing back -------------------------------------------------------------------------------


def _initializers(model: Model) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.to_proto().graph.initializer}


def _values(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)


def _structure(proto: onnx.ModelProto) -> tuple:
    """Everything of a model but its initializers' values: nodes, graph inputs and outputs, opsets."""
    graph = proto.graph
    nodes = [(n.op_type, n.domain, n.name, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in graph.node]
    values = [v.SerializeToString() for v in (*graph.input, *graph.output)]
    initializers = [(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    return nodes, values, initializers, [(o.domain, o.version) for o in proto.opset_import]


def _train(module: TorchGraph, feeds: dict, steps: int = 3) -> None:
    """A few Adam steps pulling every output toward the teacher's output plus one."""
    targets = {name: value.detach() + 1 for name, value in module(feeds).items()}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        outputs = module(feeds)
        loss = sum(((outputs[name].float() - target.float()) ** 2).mean() for name, target in targets.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("which", ["fused_transformer", "static_qdq_cnn"])
def test_trained_weights_write_back_into_the_same_graph(which, request):
    model: Model = request.getfixturevalue(which)
    before = _initializers(model)
    module = TorchGraph(model)
    feeds = {"x": torch.from_numpy(_random(2, 3, 32, 32) if which == "static_qdq_cnn" else _random(1, 8, 32))}
    _train(module, feeds)

    trained = write_back(model, module)
    proto = trained.to_proto()
    onnx.checker.check_model(proto)
    assert _structure(proto) == _structure(model.to_proto())
    after = _initializers(trained)
    changed = {n for n in before if not np.array_equal(_values(before[n]), _values(after[n]))}
    # Every float parameter moved; a few small steps move no integer code by the half that would change it.
    assert set(module.initializer_parameters()) - set(module.code_layouts()) <= changed
    assert changed <= set(module.initializer_parameters())
    assert all(np.array_equal(_values(t), _values(before[n])) for n, t in _initializers(model).items())
    numpy_feeds = {name: value.numpy() for name, value in feeds.items()}
    _assert_close(_onnxruntime(trained, numpy_feeds, optimized=True), _torch(module, numpy_feeds))


def test_frozen_parameters_keep_their_values(fused_transformer):
    module = TorchGraph(fused_transformer)
    names = sorted(module.initializer_parameters())
    module.train_only(names[:2])
    start = {n: p.detach().clone() for n, p in module.initializer_parameters().items()}
    _train(module, {"x": torch.from_numpy(_random(1, 8, 32))})
    moved = {n for n, p in module.initializer_parameters().items() if not torch.equal(p, start[n])}
    assert moved == set(names[:2])
    module.freeze(names[:1])
    assert [p.requires_grad for p in module.initializer_parameters().values()].count(True) == 1
    with pytest.raises(ValueError, match="not_a_weight"):
        module.freeze(["not_a_weight"])


def test_float16_weights_train_in_float32_and_are_written_back_as_float16():
    model = load_model(_graph(
        [N("Cast", ["x"], ["h"], to=TensorProto.FLOAT16), N("MatMul", ["h", "w"], ["p"]), N("Add", ["p", "b"], ["y"])],
        {"x": _random(3, 4)},
        {"y": TensorProto.FLOAT16},
        {"w": _random(4, 5).astype(np.float16), "b": _random(5, seed=1).astype(np.float16)},
    ))
    module = TorchGraph(model)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    feeds = {"x": _random(3, 4, seed=2)}
    _assert_close(_onnxruntime(model, feeds), _torch(module, feeds), rtol=2e-3)
    _train(module, {"x": torch.from_numpy(feeds["x"])})
    trained = write_back(model, module)
    assert {t.name: t.data_type for t in trained.to_proto().graph.initializer} == {"w": 10, "b": 10}
    _assert_close(_onnxruntime(trained, feeds), _torch(module, feeds), rtol=2e-3)


# --- refusals ------------------------------------------------------------------------------------------------


def test_a_graph_with_subgraphs_is_refused_naming_the_op():
    branch = helper.make_graph([N("Identity", ["x"], ["y_branch"])], "b", [],
                               [helper.make_tensor_value_info("y_branch", F, None)])
    model = _graph([N("Cast", ["x"], ["c"], to=TensorProto.BOOL),
                    N("ReduceMin", ["c"], ["cond"], keepdims=0),
                    N("If", ["cond"], ["y"], then_branch=branch, else_branch=branch, name="choice")],
                   {"x": _random(1)}, {"y": F})
    with pytest.raises(TorchConversionError, match="subgraphs.*If 'choice'"):
        TorchGraph(load_model(model))


def test_unmapped_ops_and_attribute_values_are_refused_in_one_error():
    model = _graph(
        [N("Hardmax", ["x"], ["a"]), N("Frobnicate", ["x"], ["b"], domain="com.example"),
         N("Resize", ["x", "", "scales"], ["c"], mode="cubic", name="smooth")],
        {"x": _random(1, 1, 2, 2)},
        {"a": F, "b": F, "c": F},
        {"scales": np.array([1, 1, 2, 2], np.float32)},
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(TorchConversionError) as refused:
        TorchGraph(load_model(model))
    message = str(refused.value)
    assert "Hardmax" in message and "com.example.Frobnicate" in message and "'smooth': Resize mode 'cubic'" in message


def test_integer_kernels_are_refused_with_the_qdq_form_as_the_way_to_train(cnn):
    data = [{"x": _random(1, 3, 32, 32, seed=i)} for i in range(2)]
    quantized = optimize(cnn, "quant:measure=false:mode=static", data=data, seed=0)[0]
    assert "QLinearConv" in _op_types(quantized)
    with pytest.raises(TorchConversionError, match="QLinearConv.*quant:format=qdq"):
        TorchGraph(quantized)


def test_importing_the_package_imports_no_torch():
    code = "import sys, onnxforge, onnxforge.distill; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
