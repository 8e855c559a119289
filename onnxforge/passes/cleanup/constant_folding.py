"""Evaluate nodes whose inputs are all constants once, at optimization time, and store their results."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxforge.ir import Model
from onnxforge.ir.edit import unique_name
from onnxforge.ir.ops import is_onnx_op
from onnxforge.passes.base import Pass, PassContext, PassResult
from onnxforge.passes.registry import register_pass

# Random ops differ per run; QuantizeLinear/DequantizeLinear on weights mark quantization for runtimes,
# and folding them would turn int8 weights back into float ones.
NEVER_FOLD = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}


# Results up to this size are always folded: shapes, indices, scalars.
SMALL_BYTES = 1024


@register_pass("fold-constants")
class FoldConstants(Pass):
    """Precompute nodes whose inputs are all constants (evaluated with onnxruntime), in subgraphs too."""

    @dataclass
    class Options:
        # Results larger than this stay computed at run time; None: the largest weight already in the model,
        # so folding never creates a weight larger than any the model had (Expand/Tile can explode).
        # Large results computed from weights the model keeps anyway (a transposed tied weight) are not
        # folded either, so folding never stores a weight twice.
        max_bytes: int | None = None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        limit = self.options.max_bytes if self.options.max_bytes is not None else _largest_constant(model)
        folded_tensors = removed = 0
        for graph in list(model.graphs()):
            graph.toposort()
            foldable = _foldable_nodes(graph)
            if not foldable:
                continue
            values = _evaluate(foldable, model)
            folded_tensors += _replace_with_constants(graph, foldable, values, limit)
            removed += _remove_unused(graph, foldable)
        return PassResult(
            changed=folded_tensors > 0,
            stats={"nodes_removed": removed, "tensors_made_constant": folded_tensors},
        )


def _foldable_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Nodes (in topological order) whose inputs are constants or results of other foldable nodes."""
    constant_results: set[int] = set()
    nodes = []
    for node in graph.nodes:
        if (
            is_onnx_op(node)
            and node.op not in NEVER_FOLD
            and not any(isinstance(a, (gs.Graph, list)) and _has_graph(a) for a in node.attrs.values())
            and all(
                t.name == "" or isinstance(t, gs.Constant) or id(t) in constant_results for t in node.inputs
            )
            and all(t.name for t in node.outputs)
            and node.op != "Identity"  # left to remove-identity, which keeps output names stable
        ):
            nodes.append(node)
            constant_results.update(id(t) for t in node.outputs)
    return nodes


def _has_graph(attr) -> bool:
    return isinstance(attr, gs.Graph) or (isinstance(attr, list) and any(isinstance(a, gs.Graph) for a in attr))


def _evaluate(nodes: list[gs.Node], model: Model) -> dict[str, np.ndarray]:
    """Run the foldable nodes in one onnxruntime session; node by node if that fails. Returns name -> value."""
    try:
        return _run_nodes(nodes, model, {})
    except Exception:  # some node fails in onnxruntime: find the ones that work
        values: dict[str, np.ndarray] = {}
        for node in nodes:
            if all(t.name == "" or isinstance(t, gs.Constant) or t.name in values for t in node.inputs):
                try:
                    values.update(_run_nodes([node], model, values))
                except Exception:
                    continue
        return values


def _run_nodes(nodes: list[gs.Node], model: Model, known: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    produced = {t.name for node in nodes for t in node.outputs}
    initializers = {}
    for node in nodes:
        for t in node.inputs:
            if t.name and t.name not in produced and t.name not in initializers:
                array = known[t.name] if t.name in known else t.values
                initializers[t.name] = onnx.numpy_helper.from_array(np.asarray(array), t.name)
    outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in sorted(produced)]
    graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(node) for node in nodes], "fold", [], outputs, list(initializers.values())
    )
    proto = onnx.helper.make_model(graph, opset_imports=list(model.header.opset_import))
    proto.ir_version = max(model.header.ir_version, 3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    # Sequences and optionals cannot become weights: only tensors are folded.
    return {name: value for name, value in zip(names, session.run(names, {})) if isinstance(value, np.ndarray)}


def _largest_constant(model: Model) -> int:
    """The largest weight, whether an initializer or a Constant node's value (some exporters use only those)."""
    sizes = [
        int(t._values.nbytes) for g in model.graphs() for t in g.tensors().values() if isinstance(t, gs.Constant)
    ]
    sizes += [
        int(node.attrs["value"]._values.nbytes)
        for g in model.graphs()
        for node in g.nodes
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant)
    ]
    return max(sizes, default=0)


def _replace_with_constants(
    graph: gs.Graph, nodes: list[gs.Node], values: dict[str, np.ndarray], limit: int
) -> int:
    """Turn the folded results that non-folded consumers need into constants; return how many."""
    folded = {id(node) for node in nodes if all(t.name in values for t in node.outputs)}
    needed: list[gs.Variable] = []
    graph_outputs = {t.name for t in graph.outputs}
    for node in nodes:
        if id(node) not in folded:
            continue
        for tensor in node.outputs:
            used_outside = tensor.name in graph_outputs or any(id(c) not in folded for c in tensor.outputs)
            if used_outside:
                needed.append(tensor)
    # Weights that unfolded nodes read stay in the model whatever we fold.
    live = {id(t) for n in graph.nodes if id(n) not in folded for t in n.inputs if isinstance(t, gs.Constant)}
    count = 0
    kept: set[int] = set()
    while needed:
        tensor = needed.pop()
        value = values[tensor.name]
        if id(tensor) in kept or isinstance(tensor, gs.Constant):
            continue
        small = value.nbytes <= SMALL_BYTES
        if (
            (small or (value.nbytes <= limit and not _copies_live_weights(tensor, values, live)))
            and tensor.name not in graph_outputs
        ):
            _make_constant_in_place(graph, tensor, value)
            count += 1
            continue
        # Too large, a second copy of weights the model keeps anyway (a transposed tied weight), or a graph
        # output: keep computing it, and make its inputs constant instead.
        producer = tensor.inputs[0]
        kept.add(id(tensor))
        needed.extend(t for t in producer.inputs if isinstance(t, gs.Variable) and t.name in values)
    return count


def _copies_live_weights(tensor: gs.Variable, values: dict[str, np.ndarray], live: set[int]) -> bool:
    """True if `tensor` is computed from a large weight that stays in the model anyway."""
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for source in current.inputs[0].inputs:
            if isinstance(source, gs.Constant):
                if id(source) in live and source._values.nbytes > SMALL_BYTES:
                    return True
            elif source.name in values:
                stack.append(source)
    return False


def _remove_unused(graph: gs.Graph, nodes: list[gs.Node]) -> int:
    """Remove those of `nodes` (in topological order) whose results nothing reads any more; return how many."""
    graph_outputs = {id(t) for t in graph.outputs}
    removed = set()
    for node in reversed(nodes):
        if all(not t.outputs and id(t) not in graph_outputs for t in node.outputs):
            node.inputs.clear()
            node.outputs.clear()
            removed.add(id(node))
    graph.nodes = [node for node in graph.nodes if id(node) not in removed]
    return len(removed)


def _make_constant_in_place(graph: gs.Graph, tensor: gs.Variable, value: np.ndarray) -> None:
    """Detach `tensor` from its producer (keeping the producer's output positions) and give it `value`."""
    producer = tensor.inputs[0]
    index = next(i for i, t in enumerate(producer.outputs) if t is tensor)
    producer.outputs[index] = gs.Variable(unique_name(graph, f"{tensor.name}_unused"))
    tensor.to_constant(np.asarray(value))
