"""Where a compressed model still computes what the original computed: the intermediate tensors both graphs
name alike, of the same shape, for distillation to match besides the outputs, and the blocks between them that
block-wise distillation trains one at a time."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.shapes import infer_shapes

# Tensors these ops produce are worth matching: a layer's output, or a residual sum and its normalization.
MATCHED_OPS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "Add", "LayerNormalization",
     "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
)  # fmt: skip


@dataclass(frozen=True)
class Block:
    """A part of the student that ends at `end` (a tensor the teacher computes alike) and the initializers that
    feed it and no earlier block."""

    end: str
    initializers: frozenset[str]


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


def blocks(teacher: Model, student: Model, trained: Collection[str], limit: int = 12) -> list[Block]:
    """At most `limit` blocks of the student, in its order, each ending at a tensor both models compute alike
    (corresponding_tensors) and holding the `trained` initializers that feed it and no earlier block.

    A block begins where a layer's weights (a trained initializer of two or more dimensions) first feed such a
    tensor, and ends at the last such tensor before the next one begins: it takes in the biases and
    normalization scales after it, and ends at a residual sum's normalization rather than at its branch, so that
    it makes up for the error of the blocks before it where the next block reads. The initializers after the
    last block belong to no block."""
    ends = corresponding_tensors(teacher, student, limit=len(student.graph.nodes))
    found = _blocks_ending_at(student, ends, set(trained))
    if len(found) > limit:
        picks = np.linspace(0, len(found) - 1, limit).round().astype(int)
        found = _blocks_ending_at(student, [found[index].end for index in dict.fromkeys(picks.tolist())], set(trained))
    return found


def _blocks_ending_at(model: Model, ends: list[str], trained: set[str]) -> list[Block]:
    tensors = model.graph.tensors()
    taken: set[str] = set()
    found: list[Block] = []
    for end in ends:
        feeding = {name: t for name, t in _initializers_feeding(tensors[end]).items() if name in trained}
        new = set(feeding) - taken
        if any(len(feeding[name].shape) >= 2 for name in new) or not found:
            if new:
                found.append(Block(end, frozenset(new)))
        else:  # only biases and normalization scales, or nothing new: the block before goes on to here
            found[-1] = Block(end, found[-1].initializers | new)
        taken |= new
    return found


def _initializers_feeding(tensor: gs.Tensor) -> dict[str, gs.Constant]:
    """The initializers that the computation of `tensor` reads, by name."""
    found, seen, waiting = {}, set(), [tensor]
    while waiting:
        current = waiting.pop()
        for node in current.inputs:  # a variable's producer (none for a graph input)
            if id(node) in seen:
                continue
            seen.add(id(node))
            for read in node.inputs:
                if isinstance(read, gs.Constant):
                    found[read.name] = read
                elif read.name:
                    waiting.append(read)
    return found
