"""Graph editing primitives every pass needs: rewire uses, bypass a node, create constants and names."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> int:
    """Make every consumer of `old` (nested subgraphs included) read `new` instead; return how many inputs changed.

    Graph outputs are not rewired here: an output keeps its name, see `bypass_node`.
    """
    count = 0
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new
                count += 1
    return count


def bypass_node(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove a node whose single output equals its first input, rewiring its consumers to that input.

    When the output is a graph output, the producer of the input writes the output directly instead;
    that is impossible (and False is returned, nothing changed) when the input is a graph input, a
    constant, another graph output, or produced in an outer graph.
    """
    source, result = node.inputs[0], node.outputs[0]
    if result in graph.outputs:
        if (
            isinstance(source, gs.Constant)
            or source in graph.inputs
            or source in graph.outputs
            or len(source.inputs) != 1
            or not any(n is source.inputs[0] for n in graph.nodes)
        ):
            return False
        node.inputs.clear()
        replace_uses(graph, source, result)
        producer = source.inputs[0]
        producer.outputs[producer.outputs.index(source)] = result
        node.outputs.clear()
        return True
    replace_uses(graph, result, source)
    node.outputs.clear()
    node.inputs.clear()
    return True


def make_constant(graph: gs.Graph, prefix: str, values: np.ndarray) -> gs.Constant:
    """Create a constant with a name not yet used in the graph."""
    return gs.Constant(unique_name(graph, prefix), np.asarray(values))


def unique_name(graph: gs.Graph, prefix: str) -> str:
    """Return `prefix`, or `prefix_N`, whichever is not yet the name of a tensor or node in the graph."""
    taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    if prefix not in taken:
        return prefix
    return next(f"{prefix}_{i}" for i in itertools.count(1) if f"{prefix}_{i}" not in taken)
