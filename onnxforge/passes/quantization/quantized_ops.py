"""Models that are quantized already: the ops that give it away."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_graphsurgeon as gs

# Ops that only appear in a model someone (or some tool) has quantized already.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QAttention",
        "QGemm",
        "DynamicQuantizeLSTM",
        "GatherBlockQuantized",
    }
)


def quantized_ops(graphs: Iterable[gs.Graph]) -> set[str]:
    """Op types in the graphs that show the model is quantized already."""
    return {node.op for graph in graphs for node in graph.nodes if node.op in QUANTIZED_OPS}
