"""Common subexpression elimination: nodes that compute the same values from the same inputs become one."""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.ir import Model
from onnxforge.ir.edit import replace_uses
from onnxforge.ir.ops import CONTRIB_DOMAIN, ONNX_DOMAINS
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass

# Domains whose operators are pure functions of their inputs and attributes, random ops aside.
# Ops of other domains may keep state or draw random numbers: they are never merged.
PURE_DOMAINS = ("", "ai.onnx.ml", CONTRIB_DOMAIN)
# Ops whose name holds one of these draw random numbers (RandomNormalLike, com.microsoft BiasDropout, ...).
# Dropout is never merged, even in inference mode, where cleanup's remove-identity removes it anyway.
RANDOM_OPS = ("Random", "Dropout", "Bernoulli", "Multinomial")
MAX_SWEEPS = 8
# Standard ops whose result does not depend on the order of their inputs.
COMMUTATIVE_OPS = frozenset(
    {"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal", "BitwiseAnd", "BitwiseOr", "BitwiseXor"}
)


@register_pass("cse")
class EliminateCommonSubexpressions(Pass):
    """Merge nodes with the same op, attributes and inputs (same tensors or equal constants) into one."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        merged = 0
        for graph in list(model.graphs()):
            in_graph = 0
            for _ in range(MAX_SWEEPS):
                found = _merge_duplicates(graph)
                in_graph += found
                if not found:
                    break
            if in_graph:
                graph.toposort()
            merged += in_graph
        return PassResult(changed=merged > 0, stats={"cse_nodes_merged": merged})


def _merge_duplicates(graph: gs.Graph) -> int:
    """One sweep in node order: rewire each duplicate's consumers to the first node like it; count merges."""
    outputs = {id(t) for t in graph.outputs}
    seen: dict[Hashable, list[gs.Node]] = {}
    removed: set[int] = set()
    for node in graph.nodes:
        key = _node_key(node)
        if key is None:
            continue
        bucket = seen.setdefault(key, [])
        kept = next((k for k in bucket if _same_constant_inputs(k, node) and _can_merge(k, node, outputs)), None)
        if kept is None:
            bucket.append(node)
            continue
        _rewire(graph, kept, node, outputs)
        removed.add(id(node))
    if removed:
        graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    return len(removed)


def _node_key(node: gs.Node) -> Hashable | None:
    """What two nodes must share to compute the same values (constants by dtype and shape only); None: never merge."""
    domain = "" if node.domain in ONNX_DOMAINS else node.domain
    if domain not in PURE_DOMAINS or any(word in node.op for word in RANDOM_OPS) or not node.outputs:
        return None
    attrs = []
    for name in sorted(node.attrs):
        value = _attribute_key(node.attrs[name])
        if value is None:
            return None
        attrs.append((name, value))
    inputs = tuple(_input_key(t) for t in _ordered_inputs(node))
    present = tuple(bool(t.name) for t in node.outputs)
    return (domain, node.op, tuple(attrs), inputs, present)


def _ordered_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The node's inputs, in a canonical order for commutative ops, so that Add(a, b) matches Add(b, a)."""
    if node.op not in COMMUTATIVE_OPS or (node.domain or "") not in ONNX_DOMAINS:
        return list(node.inputs)
    return sorted(node.inputs, key=lambda tensor: repr(_input_key(tensor)))


def _input_key(tensor: gs.Tensor | None) -> Hashable:
    if tensor is None or not tensor.name:
        return "absent"
    if isinstance(tensor, gs.Constant):
        values = tensor._values  # dtype and shape without loading a lazy weight
        return ("constant", str(values.dtype), tuple(int(d) for d in values.shape))
    return ("tensor", id(tensor))


def _attribute_key(value: object) -> Hashable | None:
    """A hashable stand-in for an attribute value that equals another's only if the values are the same."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return ("i", value)
    if isinstance(value, float):
        # float.hex tells -0.0 from 0.0 and matches NaN with NaN, as the bytes of the attribute would.
        return ("f", value.hex() if not math.isnan(value) else "nan")
    if isinstance(value, (str, bytes)):
        return ("s", value)
    if isinstance(value, (gs.Constant, np.ndarray)):
        return ("t", *_array_key(_peek(value) if isinstance(value, gs.Constant) else value))
    if isinstance(value, (list, tuple)):
        items = tuple(_attribute_key(v) for v in value)
        return None if any(item is None for item in items) else ("l", items)
    # Subgraphs (If, Loop, Scan bodies), attribute references of functions, types: never merged.
    return None


def _array_key(values: np.ndarray) -> tuple:
    if values.dtype.kind == "O":
        return (str(values.dtype), values.shape, tuple(values.reshape(-1).tolist()))
    return (str(values.dtype), values.shape, np.ascontiguousarray(values).tobytes())


def _same_constant_inputs(a: gs.Node, b: gs.Node) -> bool:
    """Inputs that are constants hold the same dtype, shape and bytes (the keys already matched the rest)."""
    return all(
        x is y or not isinstance(x, gs.Constant) or _same_values(_peek(x), _peek(y))
        for x, y in zip(_ordered_inputs(a), _ordered_inputs(b))
    )


def _peek(constant: gs.Constant) -> np.ndarray:
    """The values of a constant, read without keeping them: a weight graphsurgeon loads (`.values`) is
    exported from the loaded array, which changes string tensors, bfloat16, float8 and external weights."""
    values = constant._values
    return np.asarray(values.load() if isinstance(values, LazyValues) else values)


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "O":
        return a.reshape(-1).tolist() == b.reshape(-1).tolist()
    # Bytes, not values: -0.0 and 0.0 differ, NaN equals the same NaN.
    return np.array_equal(_bytes_of(a), _bytes_of(b))


def _bytes_of(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _can_merge(kept: gs.Node, duplicate: gs.Node, graph_outputs: set[int]) -> bool:
    # Two graph outputs cannot become one tensor (each keeps its name); keep both nodes then.
    return not any(id(k) in graph_outputs and id(d) in graph_outputs for k, d in zip(kept.outputs, duplicate.outputs))


def _rewire(graph: gs.Graph, kept: gs.Node, duplicate: gs.Node, graph_outputs: set[int]) -> None:
    """Make the duplicate's consumers read the kept node's outputs; a graph output keeps its name."""
    pairs = list(zip(kept.outputs, duplicate.outputs))
    duplicate.inputs.clear()
    duplicate.outputs.clear()
    for index, (ours, theirs) in enumerate(pairs):
        if not theirs.name:
            continue
        if id(theirs) in graph_outputs:
            # The kept node writes the graph output under its name, and its own output's readers follow.
            replace_uses(graph, ours, theirs)
            kept.outputs[index] = theirs
        else:
            replace_uses(graph, theirs, ours)
