"""Static QDQ Conv groups written as the QLinearConv that onnxruntime fuses them into at load.

onnxruntime's CPU provider turns DequantizeLinear (input, weight, bias) -> Conv [-> Relu] -> QuantizeLinear into
one QLinearConv when loading a model (its ConvNodeGroupSelector and ConvReplaceWithQLinear). Writing that
QLinearConv in the file runs the same kernel on the same constants, and leaves out the weight's and the bias's
DequantizeLinear nodes and the bias's scale vector. The conditions below are onnxruntime 1.32's: a group it
would leave unfused stays QDQ, so what runs never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

EIGHT_BIT = (np.dtype(np.uint8), np.dtype(np.int8))
# Conv attributes at these values say what their absence says: left out of the QLinearConv written.
DEFAULT_ATTRIBUTES = {"strides": 1, "dilations": 1, "pads": 0, "group": 1, "auto_pad": "NOTSET"}


@dataclass(frozen=True)
class ConvGroup:
    """A Conv with a DequantizeLinear on each input and one QuantizeLinear on its output, maybe after a Relu."""

    conv: gs.Node
    dequantize: list[gs.Node]  # of the input, the weight and (when there is one) the bias
    relu: gs.Node | None  # a Relu the output's quantization makes redundant: its zero point is the type's minimum
    quantize: gs.Node


def conv_group(graph: gs.Graph, conv: gs.Node) -> ConvGroup | None:
    """The QDQ group around `conv` if onnxruntime fuses it into QLinearConv, else None.

    Fused: every input dequantized from 8-bit codes (int8 inputs only with int8 weights), the bias from int32;
    the output read by nothing but a QuantizeLinear to the input's type, directly or through a Relu when the
    zero point is the type's minimum (the quantization clamps there anyway); no graph output in between.
    Scales and zero points must be constants, as QLinearConv's are. Groups ending in a Clip stay QDQ: onnxruntime
    decides about those itself.
    """
    if not _is(conv, "Conv"):
        return None
    dequantize = [_only_producer(tensor, "DequantizeLinear") for tensor in conv.inputs]
    if not 2 <= len(dequantize) <= 3 or any(n is None or not _constant_parameters(n) for n in dequantize):
        return None
    if len(dequantize[0].inputs) < 3 or not _per_output_channel(dequantize[1]):
        return None
    x_type, w_type = _code_type(dequantize[0]), _code_type(dequantize[1])
    if x_type not in EIGHT_BIT or w_type not in EIGHT_BIT or (x_type == np.int8 and w_type != np.int8):
        return None
    if len(dequantize) == 3 and _code_type(dequantize[2]) != np.int32:
        return None
    relu, quantize = None, _only_consumer(graph, conv.outputs[0])
    if quantize is not None and _is(quantize, "Relu"):  # the consumer is a Relu: the QuantizeLinear comes next
        relu, quantize = quantize, _only_consumer(graph, quantize.outputs[0])
    if quantize is None or not _is(quantize, "QuantizeLinear") or not _constant_parameters(quantize):
        return None
    zero_point = quantize.inputs[2].values
    if zero_point.dtype != x_type or zero_point.size != 1 or quantize.inputs[1].values.size != 1:
        return None
    if relu is not None and zero_point.item() != np.iinfo(zero_point.dtype).min:
        return None
    return ConvGroup(conv, dequantize, relu, quantize)


def write_qlinear_conv(group: ConvGroup, weight_zero_point: gs.Constant) -> None:
    """Turn `group` into one QLinearConv writing the quantized output; `weight_zero_point` stands in for a weight
    DequantizeLinear without one (a 0 of the weight's type, as onnxruntime fills in). Attributes at their defaults
    are left out, to keep the file small. DequantizeLinear nodes that other nodes still read
    stay; the rest are left without consumers, for cleanup."""
    conv, quantize = group.conv, group.quantize
    x, w = group.dequantize[0].inputs, group.dequantize[1].inputs
    inputs = [*x, w[0], w[1], w[2] if len(w) > 2 else weight_zero_point, quantize.inputs[1], quantize.inputs[2]]
    if len(group.dequantize) == 3:
        inputs.append(group.dequantize[2].inputs[0])
    output = quantize.outputs[0]
    for node in (quantize, group.relu):
        if node is not None:
            node.inputs.clear()
            node.outputs.clear()
    conv.op = "QLinearConv"
    conv.attrs = {name: value for name, value in conv.attrs.items() if not _is_default(name, value)}
    conv.inputs.clear()
    conv.inputs.extend(inputs)
    conv.outputs.clear()
    conv.outputs.append(output)


def _is_default(name: str, value) -> bool:
    default = DEFAULT_ATTRIBUTES.get(name)
    if isinstance(value, (list, tuple)):
        return default is not None and all(v == default for v in value)
    return default is not None and value == default


def _is(node: gs.Node, op: str) -> bool:
    return node.op == op and (node.domain or "") in ("", "ai.onnx")


def _only_producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    producers = list(tensor.inputs)
    return producers[0] if len(producers) == 1 and _is(producers[0], op) else None


def _only_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    consumers = list(tensor.outputs)
    if len(consumers) != 1 or any(output is tensor for output in graph.outputs):
        return None
    return consumers[0]


def _constant_parameters(node: gs.Node) -> bool:
    """Whether the scale and zero point of a (De)QuantizeLinear are constants, and it has a zero point if it
    quantizes (its zero point's type is the code type)."""
    parameters = node.inputs[1:]
    return all(isinstance(t, gs.Constant) for t in parameters) and (len(parameters) == 2 or node.op != "QuantizeLinear")


def _per_output_channel(dequantize: gs.Node) -> bool:
    """Whether a weight's DequantizeLinear has one scale, or one per output channel (axis 0), as QLinearConv takes."""
    return dequantize.inputs[1].values.size == 1 or (
        dequantize.attrs.get("axis", 1) == 0 and "block_size" not in dequantize.attrs
    )


def _code_type(dequantize: gs.Node) -> np.dtype | None:
    """The type of the codes a DequantizeLinear reads: the constant's, else its zero point's (None if neither)."""
    codes = dequantize.inputs[0]
    if isinstance(codes, gs.Constant):
        return np.dtype(codes.dtype)
    return np.dtype(dequantize.inputs[2].dtype) if len(dequantize.inputs) > 2 else None
