"""The layers passes rewrite the weights of (quantize, factorize, sparsify): float32 layers of the layer model
(ir/layers.py), and the `exclude=` patterns that keep some of them."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.layers import Layer, as_layer

HALF_PRECISION = ("float16", "bfloat16")
# The layers whose weights these passes rewrite (a ConvTranspose only loses channels, to pruning).
REWRITTEN_OPS = ("MatMul", "Gemm", "Conv", "LSTM", "GRU", "Gather")


def excluded_by(op: str, name: str, patterns: Sequence[str]) -> str | None:
    """The first of `patterns` (op types, node names or name patterns, as passes' `exclude=` takes them) that
    a node of type `op` named `name` matches, or None."""
    return next((p for p in patterns if p == op or fnmatch.fnmatchcase(name, p)), None)


def find_layers(graph: gs.Graph) -> list[Layer]:
    """The MatMul (2-D weight), Gemm (without transA), Conv, LSTM, GRU and embedding Gather layers of `graph` with
    float32 constant weights; a MatMul, Gemm or Conv reads a computed input."""
    return _rewritten(graph, ("float32",))


def half_precision_note(graph: gs.Graph, pass_name: str, shown: int = 3) -> list[str]:
    """A note naming the nodes of `graph` that would be layers but hold float16 or bfloat16 weights, for a pass
    that rewrites float32 weights only (quant, lowrank) to say why it left them alone; [] when there are none."""
    names = [layer.name for layer in _rewritten(graph, HALF_PRECISION)]
    if not names:
        return []
    listed = ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")
    return [f"{len(names)} float16/bfloat16 layers left as they are ({listed}): {pass_name} rewrites float32 weights"]


def _rewritten(graph: gs.Graph, weight_types: tuple[str, ...]) -> list[Layer]:
    layers = (as_layer(node) for node in graph.nodes)
    return [layer for layer in layers if layer is not None and _rewrites(layer, weight_types)]


def _rewrites(layer: Layer, weight_types: tuple[str, ...]) -> bool:
    if layer.op not in REWRITTEN_OPS or np.dtype(layer.weight.dtype).name not in weight_types:
        return False
    if layer.op in ("LSTM", "GRU", "Gather"):
        return True
    if isinstance(layer.activation, gs.Constant):
        return False
    if layer.op == "MatMul":
        return len(layer.weight.shape) == 2
    return layer.op == "Conv" or not layer.node.attrs.get("transA", 0)
