"""Loading models from files or protos, and saving them atomically, with external data when needed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data

from onnxforge.errors import ModelLoadError
from onnxforge.ir.external import ExternalValues, external_source
from onnxforge.ir.model import (
    PROTOBUF_LIMIT_BYTES,
    Model,
    header_of,
    paired_nodes,
    proto_graphs,
    special_value_types,
)
from onnxforge.ir.shapes import drop_inferable_value_info

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
    return proto


def _from_proto(proto: onnx.ModelProto, base_dir: Path | None) -> Model:
    try:
        graph = gs.import_onnx(proto)
    except Exception as exc:  # graphsurgeon raises assorted errors on malformed graphs
        raise ModelLoadError(f"cannot read the model graph: {str(exc).splitlines()[0]}") from None
    model = Model(graph, header_of(proto), special_value_types(proto.graph))
    for node, node_proto in paired_nodes(graph, proto.graph):
        type_kinds = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)
        dropped = [a for a in node_proto.attribute if a.type in type_kinds]  # graphsurgeon skips these
        if dropped:
            model.type_attributes[id(node)] = (node, dropped)
    for g in model.graphs():
        for name, tensor in g.tensors().items():
            if name in model.value_types and isinstance(tensor, gs.Variable):
                tensor.dtype = None  # graphsurgeon put a TypeProto here; the real type is in value_types
    for g in model.graphs():
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant) and _is_external(tensor):
                if base_dir is None:
                    raise ModelLoadError(
                        f"tensor '{tensor.name}' uses external data: load the model from its file path"
                    )
                tensor._values = ExternalValues(tensor._values.tensor, base_dir)
    return model


def _is_external(tensor: gs.Constant) -> bool:
    values = tensor._values
    return (
        isinstance(values, gs.ir.tensor.LazyValues)
        and not isinstance(values, ExternalValues)
        and isinstance(values.tensor, onnx.TensorProto)
        and uses_external_data(values.tensor)
    )


def save_model(model: Model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write the model to `path` atomically (temporary file, then rename).

    external_data: True writes weights to `<name>.data` beside the model; None does so only when the model
    already had external weights or is too large for a single protobuf. Types and shapes of intermediate
    tensors (value_info) are written only where onnx's shape inference would not find them again.
    """
    path = Path(path)
    proto = model.to_proto()
    if external_data is None:
        external_data = model.has_external_data or model.stats().bytes >= PROTOBUF_LIMIT_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    tmp_files: list[Path] = []
    try:
        if external_data:
            data_tmp = temp_beside(path.parent / data_name)
            tmp_files.append(data_tmp)
            with open(data_tmp, "wb") as out:
                _move_weights_out(proto, model, out, data_name)
        drop_inferable_value_info(proto)  # after the weights moved out: inference then copies no weights
        model_tmp = temp_beside(path)
        tmp_files.append(model_tmp)
        with open(model_tmp, "wb") as out:
            out.write(proto.SerializeToString())
        if external_data:
            os.replace(data_tmp, path.parent / data_name)
        os.replace(model_tmp, path)
    finally:
        for tmp in tmp_files:
            tmp.unlink(missing_ok=True)
    return path


def temp_beside(target: Path) -> Path:
    """An empty temporary file next to `target`, with the permissions a new file would get (mkstemp's are 0600)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def save_for_runtime(model: Model, folder: Path) -> Path:
    """Save `model` into a scratch `folder` for a runtime to load, without copying weights still on disk.

    Weights that still live in the input's data files are referenced through hard links to those files
    (onnxruntime refuses paths leading out of the model's folder, symbolic links included); where a hard
    link is impossible (another file system) they are copied. Only weights passes created are written.
    """
    path = folder / "model.onnx"
    proto = model.to_proto()
    with open(folder / "model.onnx.data", "wb") as out:
        _move_weights_out(proto, model, out, "model.onnx.data", link_dir=folder)
    path.write_bytes(proto.SerializeToString())
    return path


def _move_weights_out(
    proto: onnx.ModelProto, model: Model, out, data_name: str, link_dir: Path | None = None
) -> None:
    """Write every large tensor of `proto` into `out` and turn it into an external reference to `data_name`.

    With `link_dir`, tensors still in their source files are not copied: they refer to a link to that file.
    """
    links: dict[str, str] = {}
    external_by_path = {
        f"{source.path}@{source.offset}": source
        for g in model.graphs()
        for t in g.tensors().values()
        if isinstance(t, gs.Constant) and (source := external_source(t._values)) is not None
    }
    offset = 0
    for tensor in _all_tensors(proto.graph):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            source = external_by_path[info["location"] + f"@{int(info.get('offset', 0))}"]
            if link_dir is not None and _hard_link(source.path, link_dir, links):
                _set_external(tensor, links[str(source.path)], source.offset, source.read_length())
                continue
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


def _hard_link(source: Path, folder: Path, links: dict[str, str]) -> bool:
    """Make (once) a hard link to `source` in `folder`, recorded in `links`; False if impossible."""
    if str(source) in links:
        return True
    name = f"linked{len(links)}.data"
    try:
        os.link(source, folder / name)
    except OSError:
        return False
    links[str(source)] = name
    return True


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


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for g in proto_graphs(graph):
        yield from g.initializer
        for node in g.node:
            yield from (attr.t for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR)
