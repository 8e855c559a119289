"""Integer weight codes train in distillation: a DequantizeLinear's integer codes and MatMulNBits' packed codes
(and its scales) are parameters of a TorchGraph, read rounded and clamped, and written back rounded, clipped and
packed as stored, so the result is still a standard QDQ / MatMulNBits model that onnxruntime runs.

Models: a Conv + MatMul network quantized by onnxforge's `quant` pass (int8 static QDQ, int4 weight-only QDQ),
an MLP quantized by onnxruntime's MatMulNBitsQuantizer (4 bits with K not a multiple of the block, with and
without zero points; 8 bits), and a small graph built with onnx.helper for the initializers that stay fixed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.ir import Model, load_model

torch = pytest.importorskip("torch")
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: E402

from onnxforge.distill.torch_graph import TorchGraph, write_back  # noqa: E402

RTOL = 1e-4  # float32: error relative to each output's largest magnitude
N = helper.make_node


def _random(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs: dict, outputs: list[str], initializers: dict, opset: int = 17) -> onnx.ModelProto:
    """A model of `nodes` reading float `inputs` (name -> shape) and giving float `outputs`."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _conv_net(opset: int) -> onnx.ModelProto:
    """x[n, 3, 6, 6] -> Conv 3x3 (8 channels), Relu, flatten -> MatMul, Add -> y[n, 10]."""
    return _model(
        [N("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
         N("Reshape", ["r", "shape"], ["f"]), N("MatMul", ["f", "w"], ["m"]), N("Add", ["m", "b"], ["y"])],
        {"x": ["n", 3, 6, 6]},
        ["y"],
        {"cw": _random(8, 3, 3, 3, scale=0.3), "cb": _random(8, seed=1, scale=0.1), "shape": np.array([0, -1]),
         "w": _random(288, 10, seed=2, scale=0.05), "b": _random(10, seed=3, scale=0.1)},
        opset,
    )  # fmt: skip


def _mlp() -> onnx.ModelProto:
    """x[n, 40] -> MatMul (24), Relu -> MatMul (8) -> y: K of 40 and 24, neither a multiple of 16."""
    return _model(
        [N("MatMul", ["x", "w1"], ["h"]), N("Relu", ["h"], ["r"]), N("MatMul", ["r", "w2"], ["y"])],
        {"x": ["n", 40]},
        ["y"],
        {"w1": _random(40, 24, scale=0.3), "w2": _random(24, 8, seed=1, scale=0.3)},
    )


def _conv_samples(count: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": _random(2, 3, 6, 6, seed=10 + i)} for i in range(count)]


def _qdq_int8() -> Model:
    model, report = optimize(_conv_net(17), "quant:measure=false:mode=static:format=qdq", data=_conv_samples(),
                             seed=0, budget="none")  # fmt: skip
    assert report.passes[0].status == "applied"
    return model


def _qdq_int4() -> Model:
    model, report = optimize(_conv_net(21), "quant:measure=false:bits=4:mode=weight-only:format=qdq",
                             data=_conv_samples(), seed=0, budget="none")  # fmt: skip
    assert report.passes[0].status == "applied"
    return model


def _matmul_nbits(bits: int, symmetric: bool) -> Model:
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(_mlp(), bits=bits, block_size=16, is_symmetric=symmetric)
    quantizer.process()
    return load_model(quantizer.model.model)


MODELS = {
    "qdq_int8": _qdq_int8,
    "qdq_int4": _qdq_int4,
    "nbits4_zero_points": lambda: _matmul_nbits(4, symmetric=False),
    "nbits4_no_zero_points": lambda: _matmul_nbits(4, symmetric=True),
    "nbits8_zero_points": lambda: _matmul_nbits(8, symmetric=False),
}
# The initializers each model trains as codes, and their ONNX element type.
CODES = {
    "qdq_int8": {"cw_q": TensorProto.INT8, "w_q": TensorProto.INT8},  # cb_q, an int32 bias, stays fixed
    "qdq_int4": {"w_q": TensorProto.INT4},
    "nbits4_zero_points": {"w1_Q4": TensorProto.UINT8, "w2_Q4": TensorProto.UINT8},
    "nbits4_no_zero_points": {"w1_Q4": TensorProto.UINT8, "w2_Q4": TensorProto.UINT8},
    "nbits8_zero_points": {"w1_Q8": TensorProto.UINT8, "w2_Q8": TensorProto.UINT8},
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request) -> tuple[str, Model]:
    return request.param, MODELS[request.param]()


def _feeds(name: str, seed: int = 100) -> dict[str, np.ndarray]:
    return {"x": _random(2, 3, 6, 6, seed=seed) if name.startswith("qdq") else _random(3, 40, seed=seed)}


def _onnxruntime(model: Model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch(module: TorchGraph, feeds: dict) -> list[np.ndarray]:
    with torch.no_grad():
        return [value.numpy() for value in module(feeds).values()]


def _assert_close(expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * float(np.abs(want).max()))


def _initializers(model: Model) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.to_proto().graph.initializer}


def _structure(model: Model) -> tuple:
    """Everything of a model but its initializers' values: nodes, graph inputs and outputs, opsets."""
    proto = model.to_proto()
    graph = proto.graph
    nodes = [(n.op_type, n.domain, n.name, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in graph.node]  # fmt: skip
    values = [v.SerializeToString() for v in (*graph.input, *graph.output)]
    initializers = [(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    return nodes, values, initializers, [(o.domain, o.version) for o in proto.opset_import]


def _codes(model: Model, name: str) -> np.ndarray:
    """The codes an initializer stores, one an element (MatMulNBits' packed bytes unpacked, low nibble first)."""
    tensor = _initializers(model)[name]
    values = numpy_helper.to_array(tensor).astype(np.int64)
    node = next(n for n in model.graph.nodes if name in [t.name for t in n.inputs])
    if node.op == "MatMulNBits" and node.attrs["bits"] == 4:
        values = np.stack([values & 0x0F, values >> 4], axis=-1).reshape(*values.shape[:-1], -1)
    return values


def test_integer_codes_and_matmul_nbits_scales_are_parameters_and_match_onnxruntime(case):
    name, model = case
    module = TorchGraph(model)
    parameters = module.initializer_parameters()
    assert module.code_layouts().keys() == CODES[name].keys() <= parameters.keys()
    assert {t.name: t.data_type for t in _initializers(model).values() if t.name in CODES[name]} == CODES[name]
    assert all(parameters[code].dtype == torch.float32 for code in CODES[name])
    if name.startswith("nbits"):
        assert {"w1_scales", "w2_scales"} <= parameters.keys()
        assert not {"w1_zero_points", "w2_zero_points"} & parameters.keys()
    feeds = _feeds(name)
    _assert_close(_onnxruntime(model, feeds), _torch(module, feeds))


def test_writing_back_untrained_codes_gives_the_very_same_initializers(case):
    _, model = case
    before = {name: t.SerializeToString() for name, t in _initializers(model).items()}
    after = {name: t.SerializeToString() for name, t in _initializers(write_back(model, TorchGraph(model))).items()}
    assert after == before


def test_trained_codes_are_written_back_rounded_clipped_and_packed_into_the_same_graph(case):
    name, model = case
    module = TorchGraph(model)
    codes = list(CODES[name])
    module.train_only(codes)
    feeds = {key: torch.from_numpy(value) for key, value in _feeds(name).items()}
    targets = {key: value.detach() * 1.5 + 1 for key, value in module(feeds).items()}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.4)
    for _ in range(4):
        outputs = module(feeds)
        loss = sum(((outputs[key] - target) ** 2).mean() for key, target in targets.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layouts = module.code_layouts()
    with torch.no_grad():  # a code pushed past each end of its range: the graph reads it clamped, as stored
        flat = module.initializer_parameters()[codes[0]].view(-1)
        flat[0], flat[1] = layouts[codes[0]].high + 40.3, layouts[codes[0]].low - 40.7

    trained = write_back(model, module)
    assert _structure(trained) == _structure(model)
    for code in codes:
        old, new = _codes(model, code), _codes(trained, code)
        assert new.shape == old.shape and (new != old).any(), code
        assert layouts[code].low <= new.min() and new.max() <= layouts[code].high
    first = _codes(trained, codes[0]).reshape(-1)
    assert (first[0], first[1]) == (layouts[codes[0]].high, layouts[codes[0]].low)
    unchanged = set(_initializers(model)) - set(module.initializer_parameters())
    assert all(_initializers(trained)[n].SerializeToString() == _initializers(model)[n].SerializeToString()
               for n in unchanged)  # fmt: skip
    numpy_feeds = _feeds(name, seed=200)
    _assert_close(_onnxruntime(trained, numpy_feeds), _torch(module, numpy_feeds))


def test_matmul_nbits_padding_past_k_keeps_its_codes():
    model = _matmul_nbits(4, symmetric=False)
    module = TorchGraph(model)
    feeds = {"x": torch.from_numpy(_random(3, 40))}
    optimizer = torch.optim.Adam(module.parameters(), lr=0.5)
    for _ in range(3):
        loss = (module(feeds)["y"] - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = write_back(model, module)
    for name, k in (("w1_Q4", 40), ("w2_Q4", 24)):
        old, new = (codes.reshape(len(codes), -1) for codes in (_codes(model, name), _codes(trained, name)))
        assert (new[:, :k] != old[:, :k]).any()
        np.testing.assert_array_equal(new[:, k:], old[:, k:])


def test_integer_initializers_read_otherwise_stay_fixed_buffers():
    """Codes also cast to an output, codes whose scale is a graph input, and int32 bias codes are not trained."""
    model = load_model(_model(
        [N("DequantizeLinear", ["own_q", "own_scale"], ["own"], axis=1),
         N("DequantizeLinear", ["shared_q", "own_scale"], ["shared"], axis=1),
         N("Cast", ["shared_q"], ["shared_cast"], to=TensorProto.FLOAT),
         N("DequantizeLinear", ["fed_q", "fed_scale"], ["fed"]),
         N("DequantizeLinear", ["bias_q", "bias_scale"], ["bias"]),
         N("MatMul", ["x", "own"], ["p1"]), N("MatMul", ["p1", "shared"], ["p2"]), N("Mul", ["p2", "fed"], ["p3"]),
         N("Add", ["p3", "bias"], ["y"])],
        {"x": [2, 4], "fed_scale": []},
        ["y", "shared_cast"],
        {"own_q": np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "own_scale": np.full(4, 0.1, np.float32),
         "shared_q": np.arange(16, dtype=np.uint8).reshape(4, 4), "fed_q": np.arange(4, dtype=np.int8),
         "bias_q": np.arange(4, dtype=np.int32) * 1000, "bias_scale": np.float32(1e-4)},
    ))  # fmt: skip
    module = TorchGraph(model)
    assert module.code_layouts().keys() == {"own_q"}
    assert set(module.initializer_parameters()) == {"own_q", "own_scale"}
    module.freeze(["own_q"])
    assert not module.initializer_parameters()["own_q"].requires_grad
    feeds = {"x": _random(2, 4), "fed_scale": np.array(0.5, np.float32)}
    _assert_close(_onnxruntime(model, feeds), _torch(module, feeds))


def test_distill_after_int4_quant_moves_the_codes_and_keeps_matmul_nbits():
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((8, 40)).astype(np.float32)} for _ in range(16)]
    quantized, _ = optimize(_mlp(), "quant:measure=false:bits=4", data=samples, budget="none", seed=0)
    distilled, report = optimize(_mlp(), "quant:measure=false:bits=4,distill:steps=300:batch=4",
                                 data=samples, budget="none", seed=0)  # fmt: skip
    quant, distill = report.passes
    assert quant.status == "applied" and distill.status == "applied", distill.notes
    assert distill.stats["held_out_error_after"] <= distill.stats["held_out_error_before"]
    assert _structure(distilled) == _structure(quantized)
    packed = [n.inputs[1].name for n in distilled.graph.nodes if n.op == "MatMulNBits"]
    assert packed  # the second layer (K of 24, under a block of 32) stays float
    assert any((_codes(distilled, name) != _codes(quantized, name)).any() for name in packed)
