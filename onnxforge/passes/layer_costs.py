"""Parameters and multiply-accumulates of each layer with a constant weight, for before/after reports."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class LayerCost:
    """A layer's weight and bias elements, and its multiply-accumulates per run (None: shapes unknown)."""

    params: int
    macs: int | None


def layer_costs(graph: gs.Graph) -> dict[int, LayerCost]:
    """The cost of every Conv, ConvTranspose, MatMul and Gemm with a constant weight, by node id."""
    return {id(node): _cost(node) for node in graph.nodes if _counted(node)}


def describe_change(before: LayerCost, after: LayerCost) -> str:
    """'params 4608 -> 2304, MACs 1.2M -> 0.6M (2.00x fewer)' for a report line."""
    text = f"params {before.params} -> {after.params}"
    if before.macs and after.macs:
        text += f", MACs {_short(before.macs)} -> {_short(after.macs)} ({before.macs / after.macs:.2f}x fewer)"
    return text


def _counted(node: gs.Node) -> bool:
    return (
        node.op in COUNTED_OPS
        and (node.domain or "") in ("", "ai.onnx")
        and len(node.inputs) > 1
        and isinstance(node.inputs[1], gs.Constant)
    )


def _cost(node: gs.Node) -> LayerCost:
    weight = node.inputs[1]
    params = math.prod(weight.shape) + sum(
        math.prod(t.shape) for t in node.inputs[2:3] if isinstance(t, gs.Constant)
    )
    data, output = node.inputs[0].shape, node.outputs[0].shape
    if node.op == "ConvTranspose":  # every input element meets (outputs / group) x kernel weights
        known = data is not None and all(isinstance(d, int) for d in data)
        per_input = math.prod(weight.shape[1:])
        return LayerCost(params, math.prod(data) * per_input if known else None)
    if output is None or not all(isinstance(d, int) for d in output):
        return LayerCost(params, None)
    if node.op == "Conv":  # every output element reads (inputs / group) x kernel weights
        return LayerCost(params, math.prod(output) * math.prod(weight.shape[1:]))
    reduced = weight.shape[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else weight.shape[-2]
    return LayerCost(params, math.prod(output) * reduced)


def _short(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
