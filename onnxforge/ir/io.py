"""Loading models from files or protos, and saving them atomically, with external data when needed."""

from __future__ import annotations

import os
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data

from onnxforge.errors import ModelLoadError
from onnxforge.ir.external import ExternalValues, external_source
from onnxforge.ir.import_checks import check_attributes, check_names, check_tensors
from onnxforge.ir.model import (
    PROTOBUF_LIMIT_BYTES,
    Model,
    header_of,
    paired_nodes,
    paused_gc,
    proto_tensors,
    special_value_types,
)
from onnxforge.ir.output_set import OutputSet
from onnxforge.ir.shapes import drop_inferable_value_info

# The kinds of value graphsurgeon exports itself; others keep their type in Model.value_types.
EXPORTABLE_KINDS = ("tensor_type", "sequence_type", "sparse_tensor_type")
# Tensors at least this large go to the external data file when saving with external data.
EXTERNAL_THRESHOLD_BYTES = 1024
# Each tensor in the data file starts at a multiple of this, so runtimes can map it directly.
EXTERNAL_ALIGNMENT = 64


def load_model(source: str | os.PathLike | onnx.ModelProto | bytes) -> Model:
    """Load a model from a path, a ModelProto or serialized bytes.

    External weights are not read: they are memory-mapped from their data files when first used.
    """
    if isinstance(source, onnx.ModelProto):
        return _from_proto(source, base_dir=None)
    if isinstance(source, bytes):
        return _from_proto(_parse(source, "the given bytes"), base_dir=None)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file '{path}' not found")
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is not a file")
    return _from_proto(_parse(path.read_bytes(), f"'{path}'"), base_dir=path.parent.resolve())


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (google.protobuf.message.DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{what} is not a valid ONNX model (truncated or not ONNX): {exc}") from None
    if not data or not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(f"{what} is not an ONNX model (no graph, IR version or opset)")
    _check_text(proto, what)
    return proto


def _check_text(message: google.protobuf.message.Message, what: str) -> None:
    """Raise ModelLoadError if a text field (a name, an op type, ...) of `message` is not UTF-8.

    protobuf parses such a field into bytes instead of refusing it, and every later use of the name breaks.
    """
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            raise ModelLoadError(f"{what} is not a valid ONNX model: text field {field.full_name} is not UTF-8")
        if field.type == field.TYPE_MESSAGE:
            for item in values:
                _check_text(item, what)


def _from_proto(proto: onnx.ModelProto, base_dir: Path | None) -> Model:
    """Import `proto` after checking what would otherwise be read wrongly or change meaning: tensor data that
    does not fit its dims, values defined twice, external data outside `base_dir` (the model's folder).

    Inputs that are also initializers (inputs with a default value) become constants, listed in
    `Model.inputs_made_constant`.
    """
    check_tensors(proto.graph)
    check_attributes(proto.graph)
    inputs_with_defaults = check_names(proto.graph)
    try:
        with paused_gc():
            graph = gs.import_onnx(proto)
    except Exception as exc:  # graphsurgeon raises assorted errors on malformed graphs
        raise ModelLoadError(f"cannot read the model graph: {str(exc).splitlines()[0]}") from None
    model = Model(graph, header_of(proto), special_value_types(proto.graph))
    # Before IR version 4 every initializer had to be listed as an input too: those are weights, not defaults.
    model.inputs_made_constant = inputs_with_defaults if proto.ir_version >= 4 else []
    for node, node_proto in paired_nodes(graph, proto.graph):
        kept_as_read = [a for a in node_proto.attribute if _not_for_graphsurgeon(a)]
        for attribute in kept_as_read:
            node.attrs.pop(attribute.name, None)
        if kept_as_read:
            model.type_attributes[id(node)] = (node, kept_as_read)
    for g in model.graphs():
        for tensor in [*g.tensors().values(), *g.inputs, *g.outputs]:  # unnamed values are not in tensors()
            if not isinstance(tensor, gs.Variable) or tensor.type in EXPORTABLE_KINDS:
                continue
            # An optional, map or opaque type (restored by name from value_types on export), or an empty type
            # (valid ONNX: unknown): graphsurgeon put a TypeProto in dtype and cannot export it.
            tensor.dtype = None
            if tensor.name not in model.value_types:
                tensor.type = "tensor_type"
    for tensor in model.constants():
        if _is_external(tensor):
            if base_dir is None:
                raise ModelLoadError(f"tensor '{tensor.name}' uses external data: load the model from its file path")
            tensor._values = ExternalValues(tensor._values.tensor, base_dir)
    return model


def _not_for_graphsurgeon(attribute: onnx.AttributeProto) -> bool:
    """Attributes graphsurgeon cannot carry: types (it skips them) and empty lists (it cannot tell their type
    when exporting). They stay on the side, as read, and are put back on export."""
    kind = onnx.AttributeProto
    if attribute.type in (kind.TYPE_PROTO, kind.TYPE_PROTOS):
        return True
    lists = {kind.FLOATS: "floats", kind.INTS: "ints", kind.STRINGS: "strings", kind.TENSORS: "tensors",
             kind.GRAPHS: "graphs", kind.SPARSE_TENSORS: "sparse_tensors"}  # fmt: skip
    return attribute.type in lists and not getattr(attribute, lists[attribute.type])


def _is_external(tensor: gs.Constant) -> bool:
    values = tensor._values
    return (
        isinstance(values, gs.ir.tensor.LazyValues)
        and not isinstance(values, ExternalValues)
        and isinstance(values.tensor, onnx.TensorProto)
        and uses_external_data(values.tensor)
    )


def save_model(model: Model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write the model to `path` atomically: temporary files, renamed into place together (weights file first).

    external_data: True writes weights to `<name>.data` beside the model; None does so only when the model
    already had external weights or is too large for a single protobuf. Types and shapes of intermediate
    tensors (value_info) are written only where onnx's shape inference would not find them again.
    """
    with OutputSet() as outputs:
        stage_model(model, path, outputs, external_data)
        outputs.commit()
    return Path(path)


def stage_model(
    model: Model, path: str | os.PathLike, outputs: OutputSet, external_data: bool | None = None
) -> None:
    """Write the model (and its weights file) as temporary files of `outputs`, renamed to `path` when it commits.

    external_data: as for `save_model`.
    """
    path = Path(path)
    proto = model.to_proto()
    if external_data is None:
        external_data = model.has_external_data or model.stats().bytes >= PROTOBUF_LIMIT_BYTES
    data_name = path.name + ".data"
    if external_data:
        with open(outputs.stage_file(path.parent / data_name), "wb") as out:
            _move_weights_out(proto, model, out, data_name)
    drop_inferable_value_info(proto)  # after the weights moved out: inference then copies no weights
    with open(outputs.stage_file(path), "wb") as out:
        out.write(proto.SerializeToString())


def _move_weights_out(proto: onnx.ModelProto, model: Model, out, data_name: str) -> None:
    """Write every large tensor of `proto` into `out` and turn it into an external reference to `data_name`."""
    external_by_path = {
        f"{source.path}@{source.offset}": source
        for t in model.constants()
        if (source := external_source(t._values)) is not None
    }
    offset = 0
    for tensor in proto_tensors(proto.graph):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            source = external_by_path[info["location"] + f"@{int(info.get('offset', 0))}"]
            write = source.copy_to
        else:
            data = _tensor_bytes(tensor)
            if len(data) < EXTERNAL_THRESHOLD_BYTES:
                continue
            write = lambda f, data=data: f.write(data)  # noqa: E731
        padding = -offset % EXTERNAL_ALIGNMENT
        out.write(b"\0" * padding)
        offset += padding
        length = write(out)
        _set_external(tensor, data_name, offset, length)
        offset += length


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type == onnx.TensorProto.STRING:
        return b""  # strings cannot be stored externally
    return np.ascontiguousarray(onnx.numpy_helper.to_array(tensor)).tobytes()


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value

