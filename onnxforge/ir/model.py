"""The in-memory model: an onnx-graphsurgeon graph plus the model-level fields ONNX keeps around it."""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs

from onnxforge.ir.external import external_source

if TYPE_CHECKING:
    from onnxforge.ir.runtime_source import RuntimeSource

# Serialized protobuf messages cannot exceed 2 GiB; stay clear of the limit.
PROTOBUF_LIMIT_BYTES = 2**31 - 64 * 2**20


@dataclass(frozen=True)
class ModelStats:
    """Size of a model: node count (subgraphs included), weight elements and weight bytes."""

    nodes: int
    params: int
    bytes: int

    def to_dict(self) -> dict[str, int]:
        return {"nodes": self.nodes, "params": self.params, "bytes": self.bytes}


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block. Building a graph allocates objects that all stay
    alive, and every collection on the way would walk them all again: over half the time of copying a graph of
    tens of thousands of nodes, and growing faster than the graph."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Model:
    """A graph to transform, and the model fields (opsets, metadata, producer) that must survive saving.

    Weights are kept as onnx-graphsurgeon constants. Passes replace constant values; they never write
    into a weight array in place, because snapshots for rollback share those arrays.
    """

    def __init__(
        self, graph: gs.Graph, header: onnx.ModelProto, value_types: dict[str, onnx.TypeProto] | None = None
    ):
        self.graph = graph
        # The ModelProto without its graph and functions: ir_version, opset_import, metadata_props, ...
        self.header = header
        # Types graphsurgeon cannot carry (optional, map, opaque), by value name; restored on export.
        self.value_types = value_types or {}
        # Attributes graphsurgeon cannot carry (TYPE_PROTO, as on Optional; empty lists): id(node) -> (node,
        # attributes as read), put back on export.
        self.type_attributes: dict[int, tuple[gs.Node, list[onnx.AttributeProto]]] = {}
        # Graph inputs the file gave a default value (an initializer of the same name), imported as constants.
        self.inputs_made_constant: list[str] = []

    def copy(self) -> Model:
        """Return an independent copy of the graph structure (weight arrays are shared, not copied)."""
        with paused_gc():
            graph = self.graph.copy()
        copy = Model(graph, _copy_header(self.header), dict(self.value_types))
        # graphsurgeon's copy shares the list of opset imports, and exporting appends to it the domains the nodes
        # use: a copy that gains a contrib op must not add that domain to the original (nor to a snapshot).
        if self.graph.import_domains is not None:
            copy.graph.import_domains = list(self.graph.import_domains)
        copy.inputs_made_constant = list(self.inputs_made_constant)
        # graphsurgeon's copy forgets which values are sequences or optionals: carry their kind over. It also
        # copies a weight once per subgraph that reads it: make the copies share one constant, as the original does.
        shared: dict[int, gs.Constant] = {}
        for original, copied in zip(self.graphs(), copy.graphs()):
            kinds = {name: t.type for name, t in original.tensors().items() if isinstance(t, gs.Variable)}
            for name, tensor in copied.tensors().items():
                if isinstance(tensor, gs.Variable) and name in kinds:
                    tensor.type = kinds[name]
            for node, twin in zip(original.nodes, copied.nodes):
                if id(node) in self.type_attributes:
                    copy.type_attributes[id(twin)] = (twin, self.type_attributes[id(node)][1])
                for index, (tensor, copied_tensor) in enumerate(zip(node.inputs, twin.inputs)):
                    if isinstance(tensor, gs.Constant):
                        kept = shared.setdefault(id(tensor), copied_tensor)
                        if kept is not copied_tensor:
                            twin.inputs[index] = kept
        return copy

    def graphs(self) -> Iterator[gs.Graph]:
        """Yield the main graph and every nested subgraph (If/Loop/Scan bodies), outer first."""
        yield self.graph
        for sub in _subgraphs(self.graph):
            yield sub

    def constants(self) -> Iterator[gs.Constant]:
        """Yield each constant once: initializers and node attribute tensors (Constant nodes), subgraphs included."""
        seen: set[int] = set()
        for graph in self.graphs():
            attribute_constants = (
                value for node in graph.nodes for value in node.attrs.values() if isinstance(value, gs.Constant)
            )
            for tensor in (*graph.tensors().values(), *attribute_constants):
                if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield tensor

    def stats(self) -> ModelStats:
        """Count nodes (recursively) and the elements and bytes of all constants, Constant nodes' values and
        subgraphs' weights included, without loading lazy weights."""
        nodes = sum(len(g.nodes) for g in self.graphs())
        params = 0
        nbytes = 0
        for tensor in self.constants():
            values = tensor._values
            count = math.prod(values.shape)
            params += count
            nbytes += (count + 1) // 2 if _is_4bit(values) else int(values.nbytes)
        return ModelStats(nodes=nodes, params=params, bytes=nbytes)

    @property
    def has_external_data(self) -> bool:
        """True when some weights still live in an external data file that was not read into memory."""
        return any(external_source(t._values) is not None for t in self.constants())

    def external_data_files(self) -> set[Path]:
        """The data files (absolute paths) that weights still stored outside the model are read from."""
        return {source.path for t in self.constants() if (source := external_source(t._values)) is not None}

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto; weights still on disk stay external references (absolute paths)."""
        graph = self.graph
        for tensor in self.constants():
            source = external_source(tensor._values)
            if source:
                tensor._values = source  # export as an external reference, not a copy
        proto = gs.export_onnx(graph, do_type_check=False)
        _hoist_shared_subgraph_initializers(proto.graph)
        for node, node_proto in paired_nodes(graph, proto.graph):
            entry = self.type_attributes.get(id(node))
            if entry is not None and entry[0] is node:
                node_proto.attribute.extend(entry[1])
        if self.value_types:
            for info in _all_value_infos(proto.graph):
                if info.name in self.value_types:
                    info.type.CopyFrom(self.value_types[info.name])
        header = self.header
        opsets = {o.domain: o.version for o in header.opset_import}
        opsets.update({o.domain: o.version for o in proto.opset_import if o.domain not in opsets})
        opsets[""] = graph.opset
        for node in _all_proto_nodes(proto.graph):
            if node.domain not in opsets and node.domain != "ai.onnx":
                opsets[node.domain] = 1
        del proto.opset_import[:]
        proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
        # graphsurgeon drops initializers from the graph inputs (they become constants), which IR version 3
        # forbids: every initializer had to be an input there. IR version 4 is the first that allows it.
        proto.ir_version = max(header.ir_version, 4)
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(proto, field, getattr(header, field))
        del proto.metadata_props[:]
        proto.metadata_props.extend(header.metadata_props)
        return proto

    @contextlib.contextmanager
    def runtime_source(self) -> Iterator[RuntimeSource]:
        """Yield the model as a runtime loads it: serialized bytes whose weights still on disk stay references
        relative to the input's folder (given with them), new weights inline or, past protobuf's 2 GiB limit,
        in memory beside the bytes. Nothing is written to disk."""
        from onnxforge.ir.runtime_source import runtime_source_of

        yield runtime_source_of(self)


def _hoist_shared_subgraph_initializers(graph: onnx.GraphProto) -> None:
    """Store once, in the main graph, a weight that several subgraphs read.

    graphsurgeon writes a constant into every subgraph that reads it, so a weight of the main graph used by both
    branches of an If comes out twice. A subgraph initializer that appears, byte for byte, in more than one
    subgraph and names nothing in the main graph moves to the main graph, which subgraphs can read (outer scope).
    """
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for sub in proto_graphs(graph):
        if sub is not graph:
            for tensor in sub.initializer:
                copies.setdefault(tensor.name, []).append((sub, tensor))
    main_names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    main_names |= {name for node in graph.node for name in node.output}
    for name, found in copies.items():
        first = found[0][1].SerializeToString()
        if len(found) < 2 or name in main_names or any(t.SerializeToString() != first for _, t in found[1:]):
            continue
        graph.initializer.append(found[0][1])
        for sub, tensor in found:
            sub.initializer.remove(tensor)


def _is_4bit(values) -> bool:
    """Whether lazily loaded values are INT4/UINT4, which numpy counts as a byte each though two share one."""
    tensor = getattr(values, "tensor", None)
    return tensor is not None and tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _copy_header(header: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(header)
    return copy


def header_of(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Return the model-level fields of `proto` (everything but the graph and functions)."""
    header = onnx.ModelProto()
    header.ir_version = proto.ir_version
    header.opset_import.extend(proto.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(header, field, getattr(proto, field))
    header.metadata_props.extend(proto.metadata_props)
    header.training_info.extend(proto.training_info)
    return header


def _subgraphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    for node in graph.nodes:
        for attr in node.attrs.values():
            subs = attr if isinstance(attr, list) else [attr]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    yield sub
                    yield from _subgraphs(sub)


def paired_nodes(graph: gs.Graph, proto: onnx.GraphProto) -> Iterator[tuple[gs.Node, onnx.NodeProto]]:
    """Each node with its proto, subgraphs included (graphsurgeon imports and exports nodes in order)."""
    for node, node_proto in zip(graph.nodes, proto.node):
        yield node, node_proto
        for attr in node_proto.attribute:
            sub = node.attrs.get(attr.name)
            if attr.type == onnx.AttributeProto.GRAPH and isinstance(sub, gs.Graph):
                yield from paired_nodes(sub, attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS and isinstance(sub, list):
                for sub_graph, sub_proto in zip(sub, attr.graphs):
                    yield from paired_nodes(sub_graph, sub_proto)


def special_value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Values of `graph` (subgraphs included) whose type graphsurgeon cannot represent: optional, map, opaque."""
    return {
        info.name: info.type
        for info in _all_value_infos(graph)
        if info.type.WhichOneof("value") not in ("tensor_type", "sequence_type", "sparse_tensor_type", None)
    }


def proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every graph nested in its nodes' attributes (If/Loop/Scan bodies), outer first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from proto_graphs(sub)


def proto_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of `graph` and its subgraphs: initializers and node attribute tensors (Constant's value)."""
    for g in proto_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _all_value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    for g in proto_graphs(graph):
        yield from g.input
        yield from g.output
        yield from g.value_info


def _all_proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in proto_graphs(graph):
        yield from g.node
