"""Where a compressed model still computes what the original computed: the intermediate tensors both graphs
name alike, of the same shape, for distillation to match besides the outputs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.shapes import infer_shapes

# Tensors these ops produce are worth matching: a layer's output, or a residual sum and its normalization.
MATCHED_OPS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "Add", "LayerNormalization",
     "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
)  # fmt: skip


def corresponding_tensors(teacher: Model, student: Model, limit: int = 8) -> list[str]:
    """The names of float tensors that layers (MATCHED_OPS) of both main graphs produce, of one known shape in
    both, that are not graph inputs or outputs; at most `limit`, spread evenly in the student's order.

    A pruned layer's readers and a factored layer's second factor keep their output's name and shape, so their
    outputs are here; the pruned or factored layers' own outputs change shape and are not.
    """
    shapes = [_layer_outputs(model) for model in (teacher, student)]
    ends = {t.name for model in (teacher, student) for t in [*model.graph.inputs, *model.graph.outputs]}
    common = [name for name, shape in shapes[1].items() if shapes[0].get(name) == shape and name not in ends]
    if len(common) <= limit:
        return common
    picks = np.linspace(0, len(common) - 1, limit).round().astype(int)
    return [common[index] for index in dict.fromkeys(picks.tolist())]


def _layer_outputs(model: Model) -> dict[str, tuple]:
    """Float outputs of MATCHED_OPS nodes whose every dim is known (a number or a named dim), by name, in order."""
    probe = model.copy()
    infer_shapes(probe)
    found = {}
    for node in probe.graph.nodes:
        if node.op not in MATCHED_OPS:
            continue
        for tensor in node.outputs:
            known = tensor.shape is not None and all(isinstance(d, (int, str)) for d in tensor.shape)
            floating = tensor.dtype is not None and np.dtype(tensor.dtype).kind == "f"
            if isinstance(tensor, gs.Variable) and tensor.name and known and floating:
                found[tensor.name] = tuple(tensor.shape)
    return found


def with_outputs(model: Model, names: list[str]) -> Model:
    """A copy of `model` whose main graph also outputs the named tensors."""
    probe = model.copy()
    tensors = probe.graph.tensors()
    outputs = {t.name for t in probe.graph.outputs}
    for name in names:
        if name not in outputs:
            probe.graph.outputs.append(tensors[name])
    return probe
