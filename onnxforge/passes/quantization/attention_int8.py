"""onnxruntime's quantized attention: QAttention in place of an int8 projection, its Split and MultiHeadAttention.

`quant` writes a transformer's joint Q/K/V projection as DynamicQuantizeMatMul(x, W) -> Split ->
MultiHeadAttention(q, k, v, bias, attention_bias). onnxruntime's QAttention does the same in one operator:
DynamicQuantizeLinear(x) quantizes the input as DynamicQuantizeMatMul does (uint8, one scale), and QAttention
multiplies by the same int8 weights (one scale per column), adds the bias and attends. It takes the padding mask
as the raw 0/1 mask (`mask_index`, shape batch x sequence) instead of an additive bias, so the rewrite applies
where the attention bias is `(1 - mask) * C`, C a large negative constant, broadcast from a 2-D integer mask of
the graph: onnxruntime then masks with -10000 instead of C, which gives the same softmax wherever a row attends
to anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.edit import unique_name
from onnxforge.ir.ops import CONTRIB_DOMAIN

# The largest additive mask value read as "masked": onnxruntime masks with -10000, and a softmax weight of
# exp(-10000) or less is zero in float32 either way.
_MASKED_AT_MOST = -1e4
_MASK_MOVES = ("Unsqueeze", "Reshape", "Expand", "Cast")  # ops that only broadcast or convert the mask


@dataclass
class _Site:
    projection: gs.Node  # DynamicQuantizeMatMul
    split: gs.Node
    attention: gs.Node  # MultiHeadAttention
    mask: gs.Variable | None  # the 2-D 0/1 mask input behind its attention bias


def qattention_sites(model: Model) -> int:
    """How many attention blocks of `model`'s main graph `to_qattention` would rewrite."""
    return sum(_site(node) is not None for node in model.graph.nodes)


def to_qattention(model: Model) -> int:
    """Rewrite every site of `model`'s main graph in place; return how many were rewritten."""
    graph = model.graph
    sites = [site for node in graph.nodes if (site := _site(node)) is not None]
    masks: dict[str, gs.Variable] = {}
    for site in sites:
        projection, attention = site.projection, site.attention
        x, weight, scale = projection.inputs[:3]
        zero_point = projection.inputs[3] if len(projection.inputs) > 3 else None
        stem = attention.name or "attention"
        codes = gs.Variable(unique_name(graph, f"{stem}_input_codes"), np.uint8)
        input_scale = gs.Variable(unique_name(graph, f"{stem}_input_scale"), np.float32)
        input_zero_point = gs.Variable(unique_name(graph, f"{stem}_input_zero_point"), np.uint8)
        quantize = gs.Node(
            "DynamicQuantizeLinear", unique_name(graph, f"{stem}_quantize_input"), inputs=[x],
            outputs=[codes, input_scale, input_zero_point],
        )
        mask_index = gs.Variable.empty()
        if site.mask is not None:
            if site.mask.name not in masks:
                masks[site.mask.name] = gs.Variable(unique_name(graph, f"{site.mask.name}_int32"), np.int32)
                cast = gs.Node("Cast", unique_name(graph, f"{site.mask.name}_to_int32"), {"to": onnx.TensorProto.INT32},
                               [site.mask], [masks[site.mask.name]])
                graph.nodes.append(cast)
            mask_index = masks[site.mask.name]
        bias = attention.inputs[3]
        inputs = [codes, weight, bias, input_scale, scale, mask_index, input_zero_point]
        if zero_point is not None and zero_point.name:
            inputs.append(zero_point)
        outputs = list(attention.outputs)
        attrs = {"num_heads": attention.attrs["num_heads"]}
        for node in (projection, site.split, attention):
            node.outputs.clear()
        fused = gs.Node("QAttention", attention.name, attrs, inputs, outputs, domain=CONTRIB_DOMAIN)
        graph.nodes.extend([quantize, fused])
    if sites:
        graph.cleanup().toposort()
    return len(sites)


def _site(attention: gs.Node) -> _Site | None:
    """The projection, Split and mask behind a MultiHeadAttention that QAttention can replace, or None."""
    if attention.op != "MultiHeadAttention" or attention.domain != CONTRIB_DOMAIN:
        return None
    inputs = attention.inputs
    if len(inputs) < 4 or not inputs[3].name or not isinstance(inputs[3], gs.Constant):
        return None  # QAttention takes a bias, always
    if any(t.name for t in inputs[4:5]) or len(inputs) > 6 or any(o.name for o in attention.outputs[1:]):
        return None
    if set(attention.attrs) - {"num_heads", "scale"}:
        return None
    split = _only_producer(inputs[:3])
    if split is None or split.op != "Split" or [o.name for o in split.outputs] != [t.name for t in inputs[:3]]:
        return None
    projection = split.inputs[0].inputs[0] if split.inputs[0].inputs else None
    if projection is None or projection.op != "DynamicQuantizeMatMul" or projection.domain != CONTRIB_DOMAIN:
        return None
    if len(projection.inputs) > 4 and projection.inputs[4].name:  # the projection's own bias
        return None
    weight = projection.inputs[1]
    if not isinstance(weight, gs.Constant) or weight.values.dtype != np.int8 or len(weight.shape) != 2:
        return None
    if len(split.inputs[0].outputs) != 1 or any(len(o.outputs) != 1 for o in split.outputs):
        return None
    hidden, heads = weight.shape[1] // 3, attention.attrs["num_heads"]
    if weight.shape[1] % 3 or hidden % heads or _split_sizes(split) not in (None, [hidden] * 3):
        return None
    if "scale" in attention.attrs and not math.isclose(attention.attrs["scale"], (hidden // heads) ** -0.5,
                                                       rel_tol=1e-6):
        return None
    mask = None
    if len(inputs) > 5 and inputs[5].name:
        mask = _padding_mask(inputs[5])
        if mask is None:
            return None
    return _Site(projection, split, attention, mask)


def _only_producer(tensors: list[gs.Tensor]) -> gs.Node | None:
    producers = {id(t.inputs[0]): t.inputs[0] for t in tensors if t.inputs}
    if len(producers) != 1 or any(not t.inputs for t in tensors):
        return None
    return next(iter(producers.values()))


def _split_sizes(split: gs.Node) -> list[int] | None:
    """The Split's sizes (an attribute before opset 13, an input after); None when it splits evenly."""
    if len(split.inputs) > 1 and split.inputs[1].name:
        sizes = split.inputs[1]
        return [int(v) for v in sizes.values] if isinstance(sizes, gs.Constant) else [-1]
    if "split" in split.attrs:
        return [int(v) for v in split.attrs["split"]]
    return None


def _padding_mask(bias: gs.Tensor) -> gs.Variable | None:
    """The 2-D integer or bool graph input `bias` is `(1 - mask) * C` of (C <= -10000), broadcast; else None."""
    tensor = _through_moves(bias)
    scaled = tensor.inputs[0] if tensor.inputs else None
    if scaled is None or scaled.op != "Mul":
        return None
    constants = [t for t in scaled.inputs if isinstance(t, gs.Constant)]
    if len(constants) != 1 or constants[0].values.size != 1 or float(constants[0].values) > _MASKED_AT_MOST:
        return None
    inverted = _through_moves(next(t for t in scaled.inputs if t is not constants[0]))
    subtract = inverted.inputs[0] if inverted.inputs else None
    if subtract is None or subtract.op != "Sub" or not isinstance(subtract.inputs[0], gs.Constant):
        return None
    if subtract.inputs[0].values.size != 1 or float(subtract.inputs[0].values) != 1.0:
        return None
    mask = _through_moves(subtract.inputs[1])
    if mask.inputs or not isinstance(mask, gs.Variable) or mask.shape is None or len(mask.shape) != 2:
        return None
    if np.dtype(mask.dtype).kind not in "biu":
        return None
    return mask


def _through_moves(tensor: gs.Tensor) -> gs.Tensor:
    """`tensor`'s source through ops that only broadcast, reshape or convert it (a mask keeps its 0/1 values)."""
    while tensor.inputs and tensor.inputs[0].op in _MASK_MOVES:
        tensor = tensor.inputs[0].inputs[0]
    return tensor
