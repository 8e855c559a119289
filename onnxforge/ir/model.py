"""The in-memory model: an onnx-graphsurgeon graph plus the model-level fields ONNX keeps around it."""

from __future__ import annotations

import math
import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxforge.ir.external import external_source

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
        # Attributes graphsurgeon drops (TYPE_PROTO, as on Optional): id(node) -> (node, attributes).
        self.type_attributes: dict[int, tuple[gs.Node, list[onnx.AttributeProto]]] = {}

    def copy(self) -> Model:
        """Return an independent copy of the graph structure (weight arrays are shared, not copied)."""
        copy = Model(self.graph.copy(), _copy_header(self.header), dict(self.value_types))
        # graphsurgeon's copy forgets which values are sequences or optionals: carry their kind over.
        for original, copied in zip(self.graphs(), copy.graphs()):
            kinds = {name: t.type for name, t in original.tensors().items() if isinstance(t, gs.Variable)}
            for name, tensor in copied.tensors().items():
                if isinstance(tensor, gs.Variable) and name in kinds:
                    tensor.type = kinds[name]
            for node, twin in zip(original.nodes, copied.nodes):
                if id(node) in self.type_attributes:
                    copy.type_attributes[id(twin)] = (twin, self.type_attributes[id(node)][1])
        return copy

    def graphs(self) -> Iterator[gs.Graph]:
        """Yield the main graph and every nested subgraph (If/Loop/Scan bodies), outer first."""
        yield self.graph
        for sub in _subgraphs(self.graph):
            yield sub

    def stats(self) -> ModelStats:
        """Count nodes (recursively) and the elements and bytes of all constants, without loading lazy weights."""
        nodes = sum(len(g.nodes) for g in self.graphs())
        params = 0
        nbytes = 0
        seen: set[int] = set()
        for graph in self.graphs():
            for tensor in graph.tensors().values():
                if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                    seen.add(id(tensor))
                    values = tensor._values
                    count = math.prod(values.shape)
                    params += count
                    nbytes += (count + 1) // 2 if _is_4bit(values) else int(values.nbytes)
        return ModelStats(nodes=nodes, params=params, bytes=nbytes)

    @property
    def has_external_data(self) -> bool:
        """True when some weights still live in an external data file that was not read into memory."""
        return any(
            isinstance(t, gs.Constant) and external_source(t._values) is not None
            for g in self.graphs()
            for t in g.tensors().values()
        )

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto; weights still on disk stay external references (absolute paths)."""
        graph = self.graph
        for g in self.graphs():
            for tensor in g.tensors().values():
                source = isinstance(tensor, gs.Constant) and external_source(tensor._values)
                if source:
                    tensor._values = source  # export as an external reference, not a copy
        proto = gs.export_onnx(graph, do_type_check=False)
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
    def runtime_source(self) -> Iterator[bytes | str]:
        """Yield what onnxruntime can load: serialized bytes, or the path of a temporary saved copy.

        A temporary file is used when weights are external or the model is too large for one protobuf.
        """
        if not self.has_external_data and self.stats().bytes < PROTOBUF_LIMIT_BYTES:
            yield self.to_proto().SerializeToString()
            return
        from onnxforge.ir.io import save_for_runtime

        with tempfile.TemporaryDirectory(prefix="onnxforge-") as tmp:
            yield str(save_for_runtime(self, Path(tmp)))


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


def _all_value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    for g in proto_graphs(graph):
        yield from g.input
        yield from g.output
        yield from g.value_info


def _all_proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in proto_graphs(graph):
        yield from g.node
