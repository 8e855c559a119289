"""Expose weights to quantization: Gemm as MatMul + Add, fused Attention's Q/K/V projection as a MatMul, and
weights that Constant nodes hold as constants; and a fused SiLU after a Conv as the Sigmoid and Mul int8 kernels run.

onnxruntime fuses DequantizeLinear -> MatMul into its integer kernels, but runs DequantizeLinear -> Gemm in
float, dequantizing the weight on every run; its optimizer fuses MatMul + Add back into Gemm where the MatMul
stays float, so nothing is lost on layers that end up unquantized.

onnxruntime's com.microsoft.Attention multiplies by its packed [E, 3E] weight inside the op, where no
quantization pass sees it. MultiHeadAttention takes Q, K and V already projected (and adds their bias
itself), so Attention(x, W, b, attention_bias) becomes Split(MatMul(x, W)) -> MultiHeadAttention(q, k, v, b).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.edit import unique_name
from onnxforge.ir.ops import CONTRIB_DOMAIN


# Ops whose weight quant takes only as a constant of the graph (see find_layers).
_WEIGHT_READERS = ("MatMul", "Gemm", "Conv", "LSTM", "GRU", "Gather")


def constant_node_weights(graph: gs.Graph) -> int:
    """Make the float32 tensor of each Constant node that a layer op reads (torch writes the weights of If
    branches so) a constant of the graph, as an initializer is; return how many."""
    count = 0
    for node in list(graph.nodes):
        value = node.attrs.get("value") if node.op == "Constant" and len(node.outputs) == 1 else None
        if not isinstance(value, gs.Constant) or np.dtype(value.dtype) != np.float32:
            continue
        output = node.outputs[0]
        if output not in graph.outputs and any(reader.op in _WEIGHT_READERS for reader in output.outputs):
            node.outputs.clear()
            output.to_constant(value.values)
            count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False)
    return count


def split_gemms(graph: gs.Graph) -> int:
    """Replace each Gemm with a constant weight, no transposed input and a constant or absent C; return how many."""
    # A weight several Gemms share (an unrolled recurrent layer) gets one rewritten copy, which they then share.
    rewritten: dict[tuple[int, int, float], gs.Constant] = {}
    return _replace_each(graph, _gemm_splittable, lambda g, node: _gemm_as_matmul(g, node, rewritten))


def split_attention_projections(graph: gs.Graph) -> int:
    """Rewrite every splittable com.microsoft.Attention of `graph`; return how many were rewritten.

    An Attention is left alone when it has a mask index or past state (MultiHeadAttention spells those
    differently), a non-constant weight, or unequal Q/K/V widths.
    """
    return _replace_each(graph, _attention_splittable, _attention_as_projection)


def split_conv_silu(graph: gs.Graph) -> int:
    """Replace each QuickGelu(alpha=1) after a Conv (a SiLU the fuse pass wrote) with Sigmoid and Mul; return how
    many. onnxruntime has int8 kernels for Sigmoid and Mul, none for QuickGelu: split, the SiLU joins the Conv's int8
    region; where it stays float, onnxruntime's optimizer fuses the pair back into QuickGelu."""
    return _replace_each(graph, _conv_silu, _silu_as_sigmoid_and_mul)


def _replace_each(
    graph: gs.Graph, select: Callable[[gs.Node], bool], write: Callable[[gs.Graph, gs.Node], None]
) -> int:
    """Write a replacement for every selected node, which then drops out of the graph; return how many."""
    count = 0
    for node in list(graph.nodes):
        if select(node):
            write(graph, node)
            node.inputs.clear()
            node.outputs.clear()
            count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return count


def _gemm_splittable(node: gs.Node) -> bool:
    if node.op != "Gemm" or node.domain not in (None, "", "ai.onnx") or node.attrs.get("transA", 0):
        return False
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return bias is None or not bias.name or isinstance(bias, gs.Constant)


def _gemm_as_matmul(graph: gs.Graph, node: gs.Node, rewritten: dict[tuple[int, int, float], gs.Constant]) -> None:
    """Write `node` as MatMul (+ Add); `rewritten` holds the weights and biases made so far, by source and factor."""
    x, weight = node.inputs[0], node.inputs[1]
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    transposed = int(node.attrs.get("transB", 0))
    if transposed or alpha != 1.0:
        key = (id(weight), transposed, alpha)
        if key not in rewritten:
            values = np.asarray(weight.values)  # in its own type: a float16 Gemm stays a float16 MatMul
            values = ((values.T if transposed else values) * np.float32(alpha)).astype(values.dtype)
            name = unique_name(graph, f"{weight.name}_as_matmul")
            rewritten[key] = gs.Constant(name, np.ascontiguousarray(values))
        weight = rewritten[key]
    output = node.outputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    product = output if bias is None else gs.Variable(unique_name(graph, f"{output.name}_matmul"), output.dtype)
    name = node.name or unique_name(graph, f"{output.name}_MatMul")
    graph.nodes.append(gs.Node("MatMul", name=name, inputs=[x, weight], outputs=[product]))
    if bias is not None:
        if beta != 1.0:
            key = (id(bias), 0, beta)
            if key not in rewritten:
                scaled = (bias.values * np.float32(beta)).astype(bias.values.dtype)
                rewritten[key] = gs.Constant(unique_name(graph, f"{bias.name}_scaled"), scaled)
            bias = rewritten[key]
        graph.nodes.append(gs.Node("Add", name=f"{name}_bias", inputs=[product, bias], outputs=[output]))


def _attention_splittable(node: gs.Node) -> bool:
    if node.op != "Attention" or node.domain != CONTRIB_DOMAIN:
        return False
    inputs = node.inputs
    if len(inputs) < 3 or not isinstance(inputs[1], gs.Constant) or len(inputs[1].shape) != 2:
        return False
    if any(t.name for t in inputs[3:5]) or len(inputs) > 6 or node.attrs.get("qkv_hidden_sizes"):
        return False
    if node.attrs.get("unidirectional", 0) or node.attrs.get("do_rotary", 0):
        return False
    return inputs[1].shape[1] % 3 == 0


def _attention_as_projection(graph: gs.Graph, node: gs.Node) -> None:
    x, weight, bias = node.inputs[0], node.inputs[1], node.inputs[2]
    attention_bias = node.inputs[5] if len(node.inputs) > 5 else None
    hidden = weight.shape[1] // 3
    packed = gs.Variable(unique_name(graph, f"{node.name or 'attention'}_qkv"), np.float32)
    parts = [gs.Variable(unique_name(graph, f"{packed.name}_{part}"), np.float32) for part in "qkv"]
    split_sizes = np.array([hidden] * 3, np.int64)
    # Split takes its sizes as an input from opset 13, as an attribute before.
    split_inputs = [packed, gs.Constant(unique_name(graph, f"{packed.name}_sizes"), split_sizes)]
    split_attrs = {"axis": -1}
    if graph.opset < 13:
        split_inputs, split_attrs = [packed], {"axis": -1, "split": split_sizes.tolist()}
    attrs = {"num_heads": node.attrs["num_heads"]}
    if "scale" in node.attrs:
        attrs["scale"] = node.attrs["scale"]
    inputs = [*parts, bias if isinstance(bias, gs.Tensor) and bias.name else gs.Variable.empty()]
    if attention_bias is not None and attention_bias.name:
        inputs += [gs.Variable.empty(), attention_bias]
    name = unique_name(graph, f"{packed.name}_MatMul")
    projection = gs.Node("MatMul", name=name, inputs=[x, weight], outputs=[packed])
    split = gs.Node("Split", inputs=split_inputs, outputs=parts, attrs=split_attrs)
    outputs = list(node.outputs)
    attention = gs.Node("MultiHeadAttention", node.name, attrs, inputs, outputs, domain=CONTRIB_DOMAIN)
    graph.nodes.extend([projection, split, attention])


def _conv_silu(node: gs.Node) -> bool:
    if node.op != "QuickGelu" or node.domain != CONTRIB_DOMAIN or node.attrs.get("alpha", 1.0) != 1.0:
        return False
    return any(producer.op == "Conv" for producer in node.inputs[0].inputs)


def _silu_as_sigmoid_and_mul(graph: gs.Graph, node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    gate = gs.Variable(unique_name(graph, f"{y.name}_sigmoid"), dtype=x.dtype, shape=x.shape)
    name = node.name or y.name
    graph.nodes.append(gs.Node("Sigmoid", unique_name(graph, f"{name}_sigmoid"), inputs=[x], outputs=[gate]))
    graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{name}_mul"), inputs=[x, gate], outputs=[y]))
