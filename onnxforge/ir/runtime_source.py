"""A model as a runtime loads it, without temporary files, links or copies: the serialized model, whose weights
still in the input's data files stay references relative to the model's folder, plus the folder, plus the
largest new weights handed over in memory when inline they would pass protobuf's 2 GiB limit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx.numpy_helper
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from onnxforge.errors import ModelLoadError
from onnxforge.ir.external import ExternalValues, external_source
from onnxforge.ir.model import PROTOBUF_LIMIT_BYTES, proto_tensors

if TYPE_CHECKING:
    from collections.abc import Iterable

    from onnxforge.ir.model import Model

# Where an initializer handed over in memory points in `model_bytes`: a runtime must replace it before reading.
IN_MEMORY_LOCATION = "onnxforge-in-memory"

# Types whose numpy arrays onnxruntime takes as they are (not the ml_dtypes types, nor packed sub-byte types).
_NUMPY_NATIVE_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("FLOAT", "DOUBLE", "FLOAT16", "BOOL", "INT8", "INT16", "INT32", "INT64")
    + ("UINT8", "UINT16", "UINT32", "UINT64")
)


@dataclass(frozen=True)
class RuntimeSource:
    """What a runtime loads: `model_bytes`; `external_folder`, the real path of the folder its external data
    locations are relative to (None: it has none); and `initializers`, main-graph weights given in memory, whose
    tensors in `model_bytes` are placeholders marked external at IN_MEMORY_LOCATION."""

    model_bytes: bytes
    external_folder: Path | None = None
    initializers: Mapping[str, np.ndarray] = field(default_factory=dict)

    def load_proto(self) -> onnx.ModelProto:
        """The model with every weight in memory, for runtimes that import a ModelProto; external data is read
        with onnx's own checks that it stays in the folder."""
        proto = onnx.ModelProto()
        proto.ParseFromString(self.model_bytes)
        for tensor in proto.graph.initializer:
            if tensor.name in self.initializers:
                tensor.CopyFrom(onnx.numpy_helper.from_array(np.asarray(self.initializers[tensor.name]), tensor.name))
        if self.external_folder is not None:
            load_external_data_for_model(proto, str(self.external_folder))
        return proto


def runtime_source_of(model: Model, inline_limit: int = PROTOBUF_LIMIT_BYTES) -> RuntimeSource:
    """`model` as a RuntimeSource. Weights still in the input's data files keep their checked locations relative
    to its folder (a runtime then applies its own confinement check); new weights are inline, except the largest
    main-graph initializers when the inline ones would reach `inline_limit` bytes."""
    proto = model.to_proto()
    sources = {(str(s.path), s.offset): s for t in model.constants() if (s := external_source(t._values))}
    folder = _main_folder(sources.values())
    for tensor in proto_tensors(proto.graph):
        if uses_external_data(tensor):
            info = {entry.key: entry.value for entry in tensor.external_data}
            source = sources[(info["location"], int(info.get("offset", 0)))]
            if source.folder == folder:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = source.location
            else:
                _make_inline(tensor, source.read_bytes())
    initializers = _hand_over_largest(proto, inline_limit)
    return RuntimeSource(proto.SerializeToString(), folder, initializers)


def _main_folder(sources: Iterable[ExternalValues]) -> Path | None:
    """The folder holding most external bytes; a model loaded from one file has its weights in one folder."""
    totals: dict[Path, int] = {}
    for source in sources:
        totals[source.folder] = totals.get(source.folder, 0) + source.length
    return max(totals, key=totals.__getitem__) if totals else None


def _hand_over_largest(proto: onnx.ModelProto, limit: int) -> dict[str, np.ndarray]:
    """Turn the largest inline main-graph initializers into placeholders until the inline tensors stay under
    `limit` bytes; return their arrays by name. (A proto past 2 GiB cannot even report its size: sum tensors.)"""
    inline = sum(t.ByteSize() for t in proto_tensors(proto.graph) if not uses_external_data(t))
    if inline < limit:
        return {}
    movable = [t for t in proto.graph.initializer if not uses_external_data(t) and t.data_type in _NUMPY_NATIVE_TYPES]
    initializers: dict[str, np.ndarray] = {}
    for tensor in sorted(movable, key=lambda t: t.ByteSize(), reverse=True):
        if inline < limit:
            break
        inline -= tensor.ByteSize()
        initializers[tensor.name] = onnx.numpy_helper.to_array(tensor)
        _make_placeholder(tensor)
    if inline >= limit:
        raise ModelLoadError(
            f"the model's weights inside subgraphs or of types numpy lacks take {inline} bytes, past protobuf's "
            "2 GiB limit for one model; keep such weights smaller"
        )
    return initializers


def _make_placeholder(tensor: onnx.TensorProto) -> None:
    _clear_data(tensor)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", IN_MEMORY_LOCATION


def _make_inline(tensor: onnx.TensorProto, data: bytes) -> None:
    _clear_data(tensor)
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def _clear_data(tensor: onnx.TensorProto) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(name)
    del tensor.external_data[:]
