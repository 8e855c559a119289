"""Evaluate nodes whose inputs are all constants once, at optimization time, and store their results."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxforge.ir import Model
from onnxforge.ir.edit import replace_uses, unique_name
from onnxforge.ir.ops import is_onnx_op
from onnxforge.ir.shapes import infer_shapes
from onnxforge.limits import TimeLimitError
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass

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


# Results up to this size computed from constants no larger are always folded: shapes, indices, scalars.
SMALL_BYTES = 1024


@register_pass("fold-constants")
class FoldConstants(Pass):
    """Precompute nodes whose inputs are all constants (evaluated by onnxruntime on the CPU, whatever the
    backend), in subgraphs too."""

    @dataclass
    class Options:
        # Results larger than this stay computed at run time; None: the largest weight already in the model,
        # so folding never creates a weight larger than any the model had (Expand/Tile can explode).
        max_bytes: int | None = None
        # How many bytes folding may add to the weights (None: any). A result is stored only when the weights it
        # frees (those only folded nodes read, each counted once) are as large, less this allowance: a Tile of a
        # small constant, or a transposed copy of a weight the model keeps (a tied embedding), stays computed.
        # Results up to 1 KiB (shapes, indices) are always folded.
        max_growth: int | None = 0

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        limit = self.options.max_bytes if self.options.max_bytes is not None else _largest_constant(model)
        growth = self.options.max_growth
        sizes = ResultSizes(model)
        folded_tensors = removed = 0
        for graph in list(model.graphs()):
            graph.toposort()
            # A result over the limit would not be stored anyway: never compute it (ConstantOfShape can ask for
            # gigabytes from a few bytes of model).
            foldable = _foldable_nodes(graph, lambda node: sizes.fits(node, max(limit, SMALL_BYTES)))
            if not foldable:
                continue
            values = _evaluate(foldable, model, ctx)
            folded_tensors += _replace_with_constants(graph, foldable, values, limit, growth)
            removed += _remove_unused(graph, foldable)
        return PassResult(
            changed=folded_tensors > 0,
            stats={"nodes_removed": removed, "tensors_made_constant": folded_tensors},
        )


def _foldable_nodes(graph: gs.Graph, affordable: Callable[[gs.Node], bool]) -> list[gs.Node]:
    """Nodes (in topological order) whose inputs are constants or results of other foldable nodes, and whose
    results are `affordable` to compute."""
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
            and affordable(node)
        ):
            nodes.append(node)
            constant_results.update(id(t) for t in node.outputs)
    return nodes


# Ops whose result size depends on the values of an input (a shape, repeats, sizes, a depth), not only on
# input shapes: without those values their size cannot be bounded.
SIZE_FROM_VALUES = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot"}


class ResultSizes:
    """Upper bounds of the bytes a node's results take, known before computing them: from the shapes onnx's
    shape inference gives (run once, on a copy, only when asked), and for ops whose result size comes from an
    input's values (ConstantOfShape, Expand, Tile, Range, Resize, Pad) from those values when they are
    constants."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._inferred: dict[str, gs.Variable] | None = None

    def fits(self, node: gs.Node, limit: int) -> bool:
        """Whether `node`'s results take at most `limit` bytes; a result of unknown size fits only when it
        cannot grow beyond its inputs' size and those are known and within `limit`."""
        total = 0
        for index, tensor in enumerate(node.outputs):
            size = self._bytes(tensor, _shape_from_values(node, self._shape) if index == 0 else None)
            if size is None:
                if node.op in SIZE_FROM_VALUES:
                    return False
                inputs = [self._bytes(t) for t in node.inputs if t.name]
                if None in inputs or sum(inputs) > limit:
                    return False
                continue
            total += size
        return total <= limit

    def _shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        if self._inferred is None:  # once, and only for models with something to fold
            copy = self.model.copy()
            infer_shapes(copy)
            self._inferred = {name: t for g in copy.graphs() for name, t in g.tensors().items()}
        inferred = self._inferred.get(tensor.name)
        shape = getattr(inferred, "shape", None)
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        return tuple(shape)

    def _bytes(self, tensor: gs.Tensor, shape: tuple[int, ...] | None = None) -> int | None:
        """Bytes of `tensor` (of `shape` when given, else its known one); None when its shape is unknown."""
        known = self._shape(tensor)
        shape = known if shape is None else shape
        if shape is None or any(d < 0 for d in shape):
            return None
        dtype = tensor.dtype if isinstance(tensor, gs.Constant) else getattr(self._inferred.get(tensor.name), "dtype", None)
        try:
            itemsize = np.dtype(dtype).itemsize if dtype is not None else 8
        except TypeError:
            itemsize = 8
        return math.prod(shape) * max(itemsize, 1)


def _shape_from_values(node: gs.Node, shape_of: Callable[[gs.Tensor], tuple[int, ...] | None]
                       ) -> tuple[int, ...] | None:
    """The result shape of an op whose size comes from constant input values; None when unknown."""

    def value(index: int) -> np.ndarray | None:
        if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant) and node.inputs[index].name:
            return np.asarray(node.inputs[index].values).ravel()
        return None

    def data_shape() -> tuple[int, ...] | None:
        return shape_of(node.inputs[0]) if node.inputs else None

    if node.op == "ConstantOfShape":
        dims = value(0)
        return None if dims is None else tuple(int(d) for d in dims)
    if node.op == "Range":
        start, limit, delta = value(0), value(1), value(2)
        if start is None or limit is None or delta is None or delta[0] == 0:
            return None
        return (max(0, math.ceil((float(limit[0]) - float(start[0])) / float(delta[0]))),)
    shape = data_shape()
    if shape is None:
        return None
    if node.op == "Expand":
        dims = value(1)
        if dims is None:
            return None
        width = max(len(shape), len(dims))
        padded, target = (1,) * (width - len(shape)) + shape, (1,) * (width - len(dims)) + tuple(int(d) for d in dims)
        return tuple(max(a, b) for a, b in zip(padded, target))
    if node.op == "Tile":
        repeats = value(1)
        return None if repeats is None or len(repeats) != len(shape) else tuple(
            d * int(r) for d, r in zip(shape, repeats))
    if node.op == "Pad":
        pads = value(1)
        if pads is None or len(node.inputs) > 3 or len(pads) != 2 * len(shape):
            return None
        return tuple(d + int(pads[i]) + int(pads[i + len(shape)]) for i, d in enumerate(shape))
    if node.op == "Resize":
        sizes, scales = value(3), value(2)
        if sizes is not None and len(sizes) == len(shape):
            return tuple(int(d) for d in sizes)
        if scales is not None and len(scales) == len(shape):
            return tuple(math.floor(d * float(s)) for d, s in zip(shape, scales))
    return None


def _has_graph(attr) -> bool:
    return isinstance(attr, gs.Graph) or (isinstance(attr, list) and any(isinstance(a, gs.Graph) for a in attr))


def _evaluate(nodes: list[gs.Node], model: Model, ctx: PassContext) -> dict[str, np.ndarray]:
    """Run the foldable nodes in one model on the reference runtime (`ctx.runtime.evaluate`); node by node if that fails.
    Returns name -> value."""
    try:
        return _run_nodes(nodes, model, {}, ctx)
    except TimeLimitError:
        raise
    except Exception:  # some node fails in onnxruntime: find the ones that work
        values: dict[str, np.ndarray] = {}
        for node in nodes:
            if all(t.name == "" or isinstance(t, gs.Constant) or t.name in values for t in node.inputs):
                try:
                    values.update(_run_nodes([node], model, values, ctx))
                except TimeLimitError:
                    raise
                except Exception:
                    continue
        return values


def _run_nodes(
    nodes: list[gs.Node], model: Model, known: dict[str, np.ndarray], ctx: PassContext
) -> dict[str, np.ndarray]:
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
    return ctx.runtime.evaluate(proto)  # tensors only: sequences and optionals cannot become weights


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
    graph: gs.Graph, nodes: list[gs.Node], values: dict[str, np.ndarray], limit: int, max_growth: int | None
) -> int:
    """Turn the folded results that non-folded consumers need into constants; return how many.

    A result too large, a graph output, or in a group whose stored results would outweigh the weights they free
    by more than `max_growth` keeps being computed, and its inputs are considered for folding instead.
    """
    folded = {id(node) for node in nodes if all(t.name in values for t in node.outputs)}
    graph_outputs = {t.name for t in graph.outputs}
    pending = [
        tensor
        for node in nodes
        if id(node) in folded
        for tensor in node.outputs
        if tensor.name in graph_outputs or any(id(c) not in folded for c in tensor.outputs)
    ]
    computing = {id(n) for n in graph.nodes if id(n) not in folded}  # nodes that stay, reading their inputs
    candidates: dict[int, gs.Variable] = {}
    refused: set[int] = set()

    def keep_computing(tensor: gs.Variable) -> None:
        producer = tensor.inputs[0]
        computing.add(id(producer))
        refused.add(id(tensor))
        pending.extend(t for t in producer.inputs if isinstance(t, gs.Variable) and t.name in values)

    while True:
        while pending:
            tensor = pending.pop()
            if id(tensor) in candidates or id(tensor) in refused or isinstance(tensor, gs.Constant):
                continue
            nbytes = values[tensor.name].nbytes
            if tensor.name not in graph_outputs and (nbytes <= SMALL_BYTES or nbytes <= limit):
                candidates[id(tensor)] = tensor
            else:
                keep_computing(tensor)
        if max_growth is None:
            break
        growing = _growing_groups(list(candidates.values()), values, folded - computing, max_growth)
        if not growing:
            break
        for tensor in growing:
            del candidates[id(tensor)]
            keep_computing(tensor)
    stored: dict[bytes, gs.Constant] = {}
    for tensor in candidates.values():
        value = values[tensor.name]
        _make_constant_in_place(graph, tensor, value)
        if value.nbytes > SMALL_BYTES:  # identical results (a weight shared by two layers, transposed twice)
            twin = stored.setdefault(_content_key(value), tensor)
            if twin is not tensor:
                replace_uses(graph, tensor, twin)
    return len(candidates)


def _content_key(value: np.ndarray) -> bytes:
    """A key equal for arrays of the same type, shape and bytes."""
    digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).digest()
    return f"{value.dtype.str}{value.shape}".encode() + digest


def _growing_groups(
    results: list[gs.Variable], values: dict[str, np.ndarray], folded_away: set[int], max_growth: int
) -> list[gs.Variable]:
    """The results of the groups that would add more than `max_growth` bytes of weights: results over SMALL_BYTES,
    and smaller ones computed from a weight over it (a gate's slice of an LSTM bias); shape arithmetic is free.

    Results computed from a common weight form one group: the weight is freed only if all of them are stored.
    A weight is freed when every node reading it (in subgraphs too) is in `folded_away`.
    """
    sources = {id(t): _source_weights(t, values) for t in results}
    large = [
        t for t in results
        if values[t.name].nbytes > SMALL_BYTES or any(int(w._values.nbytes) > SMALL_BYTES for w in sources[id(t)])
    ]
    owner: dict[int, int] = {}  # freed weight -> index of the first result using it
    parent = list(range(len(large)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    freed: dict[int, int] = {}  # weight id -> bytes
    for index, tensor in enumerate(large):
        for weight in sources[id(tensor)]:
            if not all(id(consumer) in folded_away for consumer in weight.outputs):
                continue
            freed[id(weight)] = int(weight._values.nbytes)
            if id(weight) in owner:
                parent[root(index)] = root(owner[id(weight)])
            else:
                owner[id(weight)] = index
    added: dict[int, int] = {}
    removed: dict[int, int] = {}
    counted: set[tuple[int, bytes]] = set()
    for index, tensor in enumerate(large):
        key = (root(index), _content_key(values[tensor.name]))
        if key not in counted:  # identical results are stored once (see _replace_with_constants)
            counted.add(key)
            added[root(index)] = added.get(root(index), 0) + int(values[tensor.name].nbytes)
    for weight, index in owner.items():
        removed[root(index)] = removed.get(root(index), 0) + freed[weight]
    return [t for i, t in enumerate(large) if added[root(i)] - removed.get(root(i), 0) > max_growth]


def _source_weights(tensor: gs.Variable, values: dict[str, np.ndarray]) -> list[gs.Constant]:
    """The constants `tensor` is computed from, through folded nodes: weights, and the values of Constant nodes
    (which folding removes, so their bytes are freed like a weight's)."""
    stack, seen, found = [tensor], set(), {}
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        producer = current.inputs[0]
        value = producer.attrs.get("value") if producer.op == "Constant" else None
        if isinstance(value, gs.Constant):
            found[id(value)] = value
        for source in producer.inputs:
            if isinstance(source, gs.Constant):
                found[id(source)] = source
            elif source.name in values:
                stack.append(source)
    return list(found.values())


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
