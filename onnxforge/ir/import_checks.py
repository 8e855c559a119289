"""What a model file must satisfy before it is imported: tensors whose data fits their type and dims, attributes
that hold what their type says, and one definition per value name. A file breaking any would be read wrongly or
change meaning on import."""

from __future__ import annotations

import math

import onnx
from onnx.external_data_helper import uses_external_data

from onnxforge.errors import ModelLoadError
from onnxforge.ir.external import PACKED_BITS, tensor_nbytes
from onnxforge.ir.model import proto_graphs, proto_tensors

_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}


def check_tensors(graph: onnx.GraphProto) -> None:
    """Raise ModelLoadError naming the first tensor (initializer or node attribute, subgraphs included) with an
    unknown type, a negative dim, or inline data of another size than its dims need.

    External data is checked where it is resolved (`ExternalValues`): against its file.
    """
    for tensor in proto_tensors(graph):
        name = tensor.name or "(unnamed)"
        if tensor.data_type not in _KNOWN_TYPES:
            raise ModelLoadError(f"tensor '{name}' has an unknown data type ({tensor.data_type})")
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"tensor '{name}' has a negative dimension (dims {list(tensor.dims)})")
        if uses_external_data(tensor):
            if tensor.data_type == onnx.TensorProto.STRING:
                raise ModelLoadError(f"tensor '{name}' holds strings, which cannot be stored as external data")
            continue
        if tensor.HasField("raw_data"):
            if tensor.data_type == onnx.TensorProto.STRING:
                raise ModelLoadError(f"tensor '{name}' holds strings in raw_data, which ONNX does not allow")
            have, need, unit = len(tensor.raw_data), tensor_nbytes(tensor), "bytes"
        else:
            have, need, unit = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS), _value_count(tensor), "values"
        if have != need:
            raise ModelLoadError(
                f"tensor '{name}' holds {have} {unit} of data but its dims {list(tensor.dims)} need {need}; "
                "the model file is damaged"
            )


A = onnx.AttributeProto
# The field that holds an attribute's value, by its declared type.
_ATTRIBUTE_FIELDS = {
    A.FLOAT: "f", A.INT: "i", A.STRING: "s", A.TENSOR: "t", A.GRAPH: "g", A.SPARSE_TENSOR: "sparse_tensor",
    A.TYPE_PROTO: "tp", A.FLOATS: "floats", A.INTS: "ints", A.STRINGS: "strings", A.TENSORS: "tensors",
    A.GRAPHS: "graphs", A.SPARSE_TENSORS: "sparse_tensors", A.TYPE_PROTOS: "type_protos",
}  # fmt: skip
_SINGLE_MESSAGES = {"t", "g", "sparse_tensor", "tp"}


def check_attributes(graph: onnx.GraphProto) -> None:
    """Raise ModelLoadError naming the first node attribute (subgraphs included) whose type is unknown, or that
    holds a value in another field than its type names (a FLOATS attribute holding a tensor)."""
    for g in proto_graphs(graph):
        for node in g.node:
            for attribute in node.attribute:
                declared = _ATTRIBUTE_FIELDS.get(attribute.type)
                held = [f.name for f, _ in attribute.ListFields() if f.name in _ATTRIBUTE_FIELDS.values()]
                wrong = [name for name in held if name != declared]
                if declared is None or wrong or (declared in _SINGLE_MESSAGES and declared not in held):
                    what = A.AttributeType.Name(attribute.type) if declared else f"of unknown type {attribute.type}"
                    raise ModelLoadError(
                        f"attribute '{attribute.name}' of node '{node.name or node.op_type}' is {what} but holds "
                        f"{', '.join(held) or 'nothing'}; the model file is damaged"
                    )


def check_names(graph: onnx.GraphProto) -> list[str]:
    """Raise ModelLoadError naming a value defined twice in one graph (two initializers, two inputs, two node
    outputs, or a node output that is also an input or initializer), in `graph` or a subgraph, or a subgraph
    input that is also an initializer.

    Returns the main graph's inputs that are also initializers (inputs with a default value), in input order.
    """
    for g in proto_graphs(graph):
        _check_one_definition(g)
    for g in proto_graphs(graph):
        if g is not graph:
            shadowed = _inputs_with_defaults(g)
            if shadowed:
                raise ModelLoadError(
                    f"subgraph '{g.name}' has input '{shadowed[0]}' that is also one of its initializers; "
                    "the model is not valid ONNX"
                )
    return _inputs_with_defaults(graph)


def _check_one_definition(graph: onnx.GraphProto) -> None:
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if name in defined:
            raise ModelLoadError(
                f"value '{name}' is defined twice in graph '{graph.name}', first as {defined[name]}, then as "
                f"{what}; the model is not valid ONNX (one definition per value): re-export it"
            )
        defined[name] = what

    for tensor in graph.initializer:
        define(tensor.name, "an initializer")
    for sparse in graph.sparse_initializer:
        define(sparse.values.name, "a sparse initializer")
    initializers = set(defined)
    for value in graph.input:
        if value.name in initializers:
            initializers.discard(value.name)  # an input with a default value: the importer makes it a constant
            continue
        define(value.name, "a graph input")
    for node in graph.node:
        for output in node.output:
            if output:
                define(output, f"an output of node '{node.name or node.op_type}'")


def _inputs_with_defaults(graph: onnx.GraphProto) -> list[str]:
    initializers = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    return [value.name for value in graph.input if value.name in initializers]


def _value_count(tensor: onnx.TensorProto) -> int:
    """How many entries the typed data fields hold for the tensor's dims (one per packed byte for 4- and 2-bit
    types, two per complex number)."""
    bits = PACKED_BITS.get(tensor.data_type)
    if bits in (4, 2):
        return tensor_nbytes(tensor)
    count = math.prod(tensor.dims)
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return 2 * count
    return count
