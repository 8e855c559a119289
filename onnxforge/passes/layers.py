"""Layers: nodes whose constant float weights passes can rewrite (quantize, prune, factorize)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

HALF_PRECISION = ("float16", "bfloat16")

@dataclass(frozen=True)
class Layer:
    """A node with a constant float weight: which input holds it, and how the weight's axes are used.

    `out_axis` is the weight's output-channel axis (one scale per channel); `in_axis` the axis summed over
    (blocks of block quantization run along it). For an embedding Gather, rows are the channels and the
    activation is the indices.
    """

    node: gs.Node
    weight_input: int
    out_axis: int
    in_axis: int
    activation_input: int = 0

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def weight(self) -> gs.Constant:
        return self.node.inputs[self.weight_input]

    @property
    def activation(self) -> gs.Tensor:
        return self.node.inputs[self.activation_input]


def excluded_by(op: str, name: str, patterns: Sequence[str]) -> str | None:
    """The first of `patterns` (op types, node names or name patterns, as passes' `exclude=` takes them) that
    a node of type `op` named `name` matches, or None."""
    return next((p for p in patterns if p == op or fnmatch.fnmatchcase(name, p)), None)


def find_layers(graph: gs.Graph) -> list[Layer]:
    """The MatMul, Gemm, Conv, LSTM, GRU and embedding Gather nodes of `graph` with float32 constant weights."""
    layers = []
    for node in graph.nodes:
        layer = _as_layer(node)
        if layer is not None:
            layers.append(layer)
    return layers


def half_precision_note(graph: gs.Graph, pass_name: str, shown: int = 3) -> list[str]:
    """A note naming the nodes of `graph` that would be layers but hold float16 or bfloat16 weights, for a pass
    that rewrites float32 weights only (quant, lowrank) to say why it left them alone; [] when there are none."""
    names = [layer.name for layer in (_as_layer(node, HALF_PRECISION) for node in graph.nodes) if layer]
    if not names:
        return []
    listed = ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")
    return [f"{len(names)} float16/bfloat16 layers left as they are ({listed}): {pass_name} rewrites float32 weights"]


def _as_layer(node: gs.Node, weight_types: tuple[str, ...] = ("float32",)) -> Layer | None:
    def is_weight(tensor: gs.Tensor) -> bool:
        return isinstance(tensor, gs.Constant) and np.dtype(tensor.dtype).name in weight_types

    if (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    if node.op == "Gather":
        table, indices = node.inputs
        if is_weight(table) and len(table.shape) == 2 and not isinstance(indices, gs.Constant):
            if node.attrs.get("axis", 0) == 0:
                return Layer(node, 0, out_axis=0, in_axis=1, activation_input=1)
        return None
    if node.op in ("LSTM", "GRU"):
        weights = node.inputs[1:3]
        if all(is_weight(w) for w in weights) and not node.attrs.get("layout", 0):
            return Layer(node, 1, out_axis=1, in_axis=2)  # W [directions, gates * hidden, input]; R alike
        return None
    activation, weight = node.inputs[0], node.inputs[1]
    if isinstance(activation, gs.Constant) or not is_weight(weight):
        return None
    rank = len(weight.shape)
    if node.op == "MatMul" and rank == 2:
        return Layer(node, 1, out_axis=1, in_axis=0)
    if node.op == "Gemm" and rank == 2 and not node.attrs.get("transA", 0):
        if node.attrs.get("transB", 0):
            return Layer(node, 1, out_axis=0, in_axis=1)
        return Layer(node, 1, out_axis=1, in_axis=0)
    if node.op == "Conv" and rank >= 3:
        return Layer(node, 1, out_axis=0, in_axis=1)
    return None
