"""Replace what depends only on a tensor's static shape or type by constants, so shape arithmetic folds away:
Shape and Size of statically shaped tensors, CastLike of a small constant to a tensor of known type."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model, infer_shapes
from onnxforge.ir.ops import is_onnx_op
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.passes.cleanup.constant_folding import SMALL_BYTES
from onnxforge.pipeline.registry import register_pass


@register_pass("fold-shapes")
class FoldShapes(Pass):
    """Turn Shape/Size of statically shaped tensors, and CastLike of small constants, into constants."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        inference = infer_shapes(model)
        graph = model.graph
        replaced = set()
        for node in graph.nodes:
            value = _static_result(node)
            if value is None or node.outputs[0] in graph.outputs:
                continue
            result = node.outputs[0]
            node.outputs.clear()
            node.inputs.clear()
            result.to_constant(value)
            replaced.add(id(node))
        graph.nodes = [node for node in graph.nodes if id(node) not in replaced]
        replaced = len(replaced)
        stats = {"shape_nodes_folded": replaced}
        if not inference.ok:
            stats["shape_inference"] = f"failed: {inference.message}"
        return PassResult(changed=replaced > 0, stats=stats)


def _static_result(node: gs.Node) -> np.ndarray | None:
    if is_onnx_op(node, "CastLike"):
        return _cast_like(node)
    if not is_onnx_op(node, "Shape", "Size") or not node.inputs:
        return None
    source = node.inputs[0]
    shape = source.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    dims = [int(d) for d in shape]
    if node.op == "Size":
        return np.array(math.prod(dims), dtype=np.int64)
    rank = len(dims)
    start = _clamp(node.attrs.get("start", 0), rank)
    end = _clamp(node.attrs.get("end", rank), rank)
    return np.array(dims[start:end], dtype=np.int64)


def _cast_like(node: gs.Node) -> np.ndarray | None:
    """CastLike(constant, x) needs only x's type: the dynamo exporter writes a Conv's zero bias so, with x the
    model's input, and a bias left computed keeps BatchNorm from folding into the Conv."""
    value, like = node.inputs[0], node.inputs[1]
    if not isinstance(value, gs.Constant) or like.dtype is None:
        return None
    dtype = np.dtype(like.dtype)
    if dtype.kind not in "biuf" or value.values.size * dtype.itemsize > SMALL_BYTES:
        return None
    return np.asarray(value.values).astype(dtype)


def _clamp(index: int, rank: int) -> int:
    index = index + rank if index < 0 else index
    return min(max(index, 0), rank)
