"""A small example model, built offline, that looks the way exporters leave real models.

`python -m onnxforge.examples example.onnx` writes it; `optimize example.onnx --passes cleanup` then has
something to do: the model is a small CNN classifier (1x3x32x32 in, 10 logits out) that also carries the
clutter `cleanup` removes: Identity nodes (one of them passing a shared weight), an inference-mode Dropout,
a dead auxiliary head, a Shape->Gather->Unsqueeze->Concat->Reshape flatten on a static shape, Constant
nodes with constant arithmetic on them, and two initializers holding the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.ir import load_model, save_model

INPUT_SHAPE = (1, 3, 32, 32)
CLASSES = 10
OPSET = 17


def build_example_model(seed: int = 0) -> onnx.ModelProto:
    """Return the example CNN (weights drawn from `seed`) with the redundancy an exporter leaves behind."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        values = rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        return numpy_helper.from_array(values, name)

    def bias(name: str, size: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(size) * 0.1).astype(np.float32), name)

    # Two residual convolutions share one bias tensor in the source module; the exporter wrote it twice.
    shared_bias = bias("block.conv_a.bias", 16)
    duplicate_bias = numpy_helper.from_array(numpy_helper.to_array(shared_bias).copy(), "block.conv_b.bias")
    initializers = [
        weight("stem.weight", 8, 3, 3, 3),
        bias("stem.bias", 8),
        weight("down.weight", 16, 8, 3, 3),
        bias("down.bias", 16),
        weight("block.conv_a.weight", 16, 16, 3, 3),
        shared_bias,
        duplicate_bias,
        weight("aux.weight", 16, 10),
        weight("fc1.weight", 16 * 16 * 16, 64),
        bias("fc1.bias", 64),
        weight("fc2.weight", 64, CLASSES),
        bias("fc2.bias", CLASSES),
    ]

    def constant(output: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [output], name=f"/{output}/Constant", value=numpy_helper.from_array(value, output)
        )

    nodes = [
        # stem: Conv -> Relu, then an Identity on the activation (a no-op module such as nn.Identity).
        helper.make_node(
            "Conv", ["x", "stem.weight", "stem.bias"], ["stem_conv"], name="/stem/Conv", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["stem_conv"], ["stem_relu"], name="/stem/Relu"),
        helper.make_node("Identity", ["stem_relu"], ["stem_out"], name="/stem/act_post/Identity"),
        # downsample to 16x16x16
        helper.make_node(
            "Conv",
            ["stem_out", "down.weight", "down.bias"],
            ["down_conv"],
            name="/down/Conv",
            pads=[1, 1, 1, 1],
            strides=[2, 2],
        ),
        helper.make_node("Relu", ["down_conv"], ["down_relu"], name="/down/Relu"),
        # residual block whose two convs share a weight: the exporter passes it through an Identity.
        helper.make_node("Identity", ["block.conv_a.weight"], ["block.conv_b.weight"], name="/block/Identity"),
        helper.make_node(
            "Conv",
            ["down_relu", "block.conv_a.weight", "block.conv_a.bias"],
            ["block_a"],
            name="/block/conv_a/Conv",
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["block_a"], ["block_a_relu"], name="/block/Relu"),
        helper.make_node(
            "Conv",
            ["block_a_relu", "block.conv_b.weight", "block.conv_b.bias"],
            ["block_b"],
            name="/block/conv_b/Conv",
            pads=[1, 1, 1, 1],
        ),
        # a residual scale computed from constants at run time: 1 / sqrt(2)
        constant("residual_two", np.array(2.0, dtype=np.float32)),
        helper.make_node("Sqrt", ["residual_two"], ["residual_sqrt"], name="/block/Sqrt"),
        helper.make_node("Reciprocal", ["residual_sqrt"], ["residual_scale"], name="/block/Reciprocal"),
        helper.make_node("Add", ["block_b", "down_relu"], ["block_sum"], name="/block/Add"),
        helper.make_node("Mul", ["block_sum", "residual_scale"], ["block_scaled"], name="/block/Mul"),
        helper.make_node("Relu", ["block_scaled"], ["block_out"], name="/block/Relu_1"),
        # dead auxiliary head, kept from training: its result is no graph output
        helper.make_node("GlobalAveragePool", ["block_out"], ["aux_pool"], name="/aux/GlobalAveragePool"),
        helper.make_node("Flatten", ["aux_pool"], ["aux_flat"], name="/aux/Flatten"),
        helper.make_node("MatMul", ["aux_flat", "aux.weight"], ["aux_logits"], name="/aux/MatMul"),
        # x.view(x.size(0), -1), traced: the batch size is read from the (static) shape at run time
        helper.make_node("Shape", ["block_out"], ["flat_shape"], name="/Shape"),
        constant("flat_batch_index", np.array(0, dtype=np.int64)),
        helper.make_node("Gather", ["flat_shape", "flat_batch_index"], ["flat_batch"], name="/Gather", axis=0),
        constant("flat_unsqueeze_axes", np.array([0], dtype=np.int64)),
        helper.make_node("Unsqueeze", ["flat_batch", "flat_unsqueeze_axes"], ["flat_batch_1d"], name="/Unsqueeze"),
        constant("flat_rest", np.array([-1], dtype=np.int64)),
        helper.make_node("Concat", ["flat_batch_1d", "flat_rest"], ["flat_target"], name="/Concat", axis=0),
        helper.make_node("Reshape", ["block_out", "flat_target"], ["flat"], name="/Reshape"),
        # classifier: MatMul + Add, Relu, Dropout (inference mode), MatMul + Add, Identity to the output name
        helper.make_node("MatMul", ["flat", "fc1.weight"], ["fc1_mm"], name="/fc1/MatMul"),
        helper.make_node("Add", ["fc1_mm", "fc1.bias"], ["fc1_out"], name="/fc1/Add"),
        helper.make_node("Relu", ["fc1_out"], ["fc1_relu"], name="/fc1/Relu"),
        helper.make_node("Dropout", ["fc1_relu"], ["fc1_drop"], name="/dropout/Dropout"),
        helper.make_node("MatMul", ["fc1_drop", "fc2.weight"], ["fc2_mm"], name="/fc2/MatMul"),
        helper.make_node("Add", ["fc2_mm", "fc2.bias"], ["fc2_out"], name="/fc2/Add"),
        helper.make_node("Identity", ["fc2_out"], ["logits"], name="/Identity"),
    ]
    graph = helper.make_graph(
        nodes,
        "onnxforge_example_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [INPUT_SHAPE[0], CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxforge.examples"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    """Write the example model to the path given on the command line (default example.onnx)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m onnxforge.examples [OUT.onnx]  (writes the example model, default example.onnx)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    path = Path(args[0] if args else "example.onnx")
    proto = build_example_model()
    model = load_model(proto)
    save_model(model, path)
    stats = model.stats()
    print(
        f"wrote {path}: example CNN, input x {'x'.join(map(str, INPUT_SHAPE))}, output logits 1x{CLASSES}, "
        f"{stats.nodes} nodes, {stats.params} weights ({stats.bytes / 1e6:.2f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
