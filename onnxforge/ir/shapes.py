"""Shape and type inference on the IR: onnx's inference, tolerant of ops it does not know."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import onnx.defs
import onnx.external_data_helper
import onnx.shape_inference
import onnx_graphsurgeon as gs

from onnxforge.ir.model import Model, proto_graphs

# Where the skeleton's large weights claim to be; nothing is ever read from it.
SKELETON_DATA = "skeleton.data"


@dataclass(frozen=True)
class ShapeInferenceResult:
    """Whether onnx's inference ran, how many tensors got a shape, and why it failed if it did."""

    ok: bool
    tensors_with_shape: int
    message: str = ""


def infer_shapes(model: Model) -> ShapeInferenceResult:
    """Fill in the shapes and dtypes of intermediate tensors, in place.

    Uses onnx's strict shape inference with data propagation (so static shape computations resolve).
    When that fails (an inconsistent node), it falls back to onnx's lenient mode, which infers what it
    can around the failure; ops it does not know (custom domains) are skipped. The failure is returned
    in the result instead of raised.
    """
    proto = skeleton_proto(model)
    message = ""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError or RuntimeError
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception:  # even lenient inference failed: keep the shapes the graph has
            return ShapeInferenceResult(False, 0, message)
    infos = {}
    _collect_value_infos(inferred.graph, infos)
    updated = 0
    for graph in model.graphs():
        for name, tensor in graph.tensors().items():
            info = infos.get(name)
            if isinstance(tensor, gs.Variable) and info is not None and info.type.HasField("tensor_type"):
                tensor_type = info.type.tensor_type
                if tensor_type.elem_type:
                    tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
                if tensor_type.HasField("shape"):
                    tensor.shape = [_dim(d) for d in tensor_type.shape.dim]
                    updated += 1
    return ShapeInferenceResult(not message, updated, message)


@contextlib.contextmanager
def merged_symbolic_dims(model: Model) -> Iterator[int]:
    """Within the block, the main graph's tensors hold the dims onnxruntime's symbolic shape inference finds where
    onnx's left a dim unknown or invented (`unk__N`); yields how many tensors changed, and restores their shapes
    on exit.

    It merges the symbolic dims an op requires equal (`auto_merge`: the operands of a broadcast, a Reshape's
    leading axes), which is what lets a batch named by the input reach a head merge written `reshape(*shape, -1)`.
    That is an assumption where one operand could be 1 at run time: an analysis may read it, a model must not keep
    it (onnxruntime reuses buffers between tensors whose dims have one name). Nothing changes when it fails.
    """
    found = _symbolic_dims(model)
    changed = {}
    for name, tensor in model.graph.tensors().items():
        dims = found.get(name)
        if not isinstance(tensor, gs.Variable) or dims is None:
            continue
        current = list(tensor.shape) if tensor.shape is not None else None
        if current is not None and len(current) != len(dims):
            continue
        merged = [
            f if c is None or (isinstance(c, str) and c.startswith("unk__") and f is not None) else c
            for c, f in zip(current or dims, dims)
        ]
        if merged != current:
            changed[name] = (tensor, tensor.shape)
            tensor.shape = merged
    try:
        yield len(changed)
    finally:
        for tensor, shape in changed.values():
            tensor.shape = shape


def _symbolic_dims(model: Model) -> dict[str, list]:
    """The dims onnxruntime's symbolic shape inference (auto_merge) gives the main graph's values, by name; empty
    when it fails or the model has weights in subgraphs."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    skeleton = skeleton_proto(model)
    subgraphs = itertools.islice(proto_graphs(skeleton.graph), 1, None)  # the main graph comes first
    if any(t.data_location == onnx.TensorProto.EXTERNAL for g in subgraphs for t in g.initializer):
        return {}  # a subgraph's weights cannot become inputs (a Loop body's are positional) and are never opened
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns about every merge
    try:
        # Its `infer_shapes` driver, less the step that saves the model into the working folder when some shape
        # stays unknown: a run writes no file.
        inference = SymbolicShapeInference(2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
        inference._preprocess(_weights_as_inputs(skeleton))
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        inferred = inference.out_mp_
    except Exception:  # noqa: BLE001 - its failure (unsupported op, bad model) leaves onnx's shapes
        return {}
    finally:
        logger.setLevel(level)
    return {
        info.name: [_dim(d) for d in info.type.tensor_type.shape.dim]
        for info in inferred.graph.value_info
        if info.type.tensor_type.HasField("shape")
    }


def _weights_as_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The skeleton with its data-less weights made graph inputs of their shape, so no tool opens their file."""
    graph = proto.graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        graph.initializer.remove(tensor)
    return proto


def skeleton_proto(model: Model) -> onnx.ModelProto:
    """Export the model with large weights marked external (not read), for inference and checking."""
    proto = model.to_proto()
    _mark_weights_external(proto)
    return proto


def drop_inferable_value_info(proto: onnx.ModelProto) -> int:
    """Remove from `proto` (in place) the value_info entries onnx's shape inference rebuilds exactly; return how many.

    value_info only caches what inference finds, and runtimes infer again at load. Kept: the entries inference
    does not rebuild, or rebuilds differently (outputs of ops onnx has no schema for, shapes only data
    propagation finds, names given to dimensions); an entry inference rebuilds once those are given is dropped.
    Nothing is dropped if inference fails.
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    _mark_weights_external(skeleton)
    graphs = list(proto_graphs(skeleton.graph))
    given = [{info.name: info for info in graph.value_info} for graph in graphs]
    # Outputs of ops onnx has no schema for (other domains') are never inferred: kept without asking.
    kept = [_outputs_without_schema(graph) & set(entries) for graph, entries in zip(graphs, given)]
    while True:
        for graph, entries, names in zip(graphs, given, kept):
            del graph.value_info[:]
            graph.value_info.extend(entries[name] for name in names)
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=False)
        except Exception:  # onnx raises InferenceError, ValidationError or RuntimeError
            return 0
        added = 0
        for graph, inferred_graph, entries, names in zip(graphs, proto_graphs(inferred.graph), given, kept):
            found = {info.name: info.type for info in inferred_graph.value_info}
            missed = {name for name, info in entries.items() if name not in names and found.get(name) != info.type}
            # Keep the first entries missed; those computed from them may be inferred once they are given.
            first = missed - _downstream(graph, missed)
            names.update(first)
            added += len(first)
        if not added:
            break
    dropped = 0
    for graph, names in zip(proto_graphs(proto.graph), kept):
        infos = [info for info in graph.value_info if info.name in names]
        dropped += len(graph.value_info) - len(infos)
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return dropped


def _outputs_without_schema(graph: onnx.GraphProto) -> set[str]:
    return {
        name
        for node in graph.node
        if not onnx.defs.has(node.op_type, "" if node.domain == "ai.onnx" else node.domain)
        for name in node.output
    }


def _downstream(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """The tensors of `graph` computed from any of `names` (its nodes are in topological order)."""
    reached: set[str] = set()
    for node in graph.node:
        if any(name in names or name in reached for name in node.input):
            reached.update(node.output)
    return reached


def _mark_weights_external(proto: onnx.ModelProto) -> None:
    """Mark the large weights of `proto` external (their data dropped): shapes and types are all inference reads."""
    for tensor in _initializers(proto.graph):
        if onnx.external_data_helper.uses_external_data(tensor) or (
            tensor.HasField("raw_data") and len(tensor.raw_data) > 1024
        ):
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", SKELETON_DATA


def _initializers(graph: onnx.GraphProto):
    for g in proto_graphs(graph):
        yield from g.initializer


def _collect_value_infos(graph: onnx.GraphProto, infos: dict) -> None:
    for g in proto_graphs(graph):
        for info in [*g.value_info, *g.output, *g.input]:
            infos.setdefault(info.name, info)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None
