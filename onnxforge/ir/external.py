"""Weights stored in external data files, read through memory maps instead of into memory."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.errors import ModelLoadError


class ExternalValues(LazyValues):
    """Lazy values of a tensor whose bytes lie in an external data file inside the model's folder.

    The location is checked before anything is opened (see `confined_location`), and so are the offset and
    length against the file and the tensor's dims. `location` keeps the checked location, relative to `folder`;
    the tensor's own location is rewritten to the absolute `path`, so the model can be saved anywhere
    (including over its own input file) by streaming bytes from the original file.
    """

    def __init__(self, tensor: onnx.TensorProto, folder: Path):
        super().__init__(tensor)
        info = {entry.key: entry.value for entry in tensor.external_data}
        self.folder = Path(os.path.realpath(folder))
        self.location = info.get("location", "")
        self.path = confined_location(tensor.name, self.location, self.folder)
        self.offset = _byte_count(tensor.name, info, "offset", 0)
        expected = tensor_nbytes(tensor)
        self.length = _byte_count(tensor.name, info, "length", expected)
        if self.length != expected:
            raise ModelLoadError(
                f"tensor '{tensor.name}': external data length {self.length} does not match its dims "
                f"{list(tensor.dims)}, which need {expected} bytes"
            )
        size = self.path.stat().st_size
        if self.offset + self.length > size:
            raise ModelLoadError(
                f"tensor '{tensor.name}': external data at offset {self.offset}, length {self.length} runs past "
                f"the end of '{self.location}' ({size} bytes); the data file is truncated or not this model's"
            )
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(self.path)

    def load(self) -> np.ndarray:
        """Return the tensor as a read-only array mapped from the data file."""
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        shape = tuple(int(d) for d in self.tensor.dims)
        if np_dtype.itemsize * math.prod(shape) == self.read_length():
            mapped = MappedWeights(self.path, dtype=np_dtype, mode="r", offset=self.offset, shape=shape)
            mapped.source = self
            return mapped
        # Packed sub-byte types (int4, float4): let onnx unpack a copy.
        raw = onnx.TensorProto()
        raw.CopyFrom(self.tensor)
        del raw.external_data[:]
        raw.data_location = onnx.TensorProto.DEFAULT
        raw.raw_data = self.read_bytes()
        return onnx.numpy_helper.to_array(raw)

    def read_length(self) -> int:
        """Number of bytes this tensor occupies in its data file."""
        return self.length

    def read_bytes(self) -> bytes:
        """Read this tensor's bytes from its data file."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.read_length())

    def copy_to(self, out, chunk: int = 64 * 2**20) -> int:
        """Stream this tensor's bytes into the open binary file `out`; return the number of bytes written."""
        remaining = self.read_length()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while remaining:
                block = f.read(min(chunk, remaining))
                if not block:
                    raise ModelLoadError(f"external data file '{self.path}' ended early")
                out.write(block)
                remaining -= len(block)
        return self.read_length()


class MappedWeights(np.memmap):
    """A read-only map of one whole external tensor that remembers its source.

    onnx-graphsurgeon replaces lazy values by the loaded array on first access; `source` lets the model
    export the tensor as an external reference again instead of copying it. Slices and views lose it.
    """

    source: ExternalValues | None = None

    def __array_finalize__(self, obj) -> None:
        super().__array_finalize__(obj)
        self.source = None


def external_source(values: object) -> ExternalValues | None:
    """The external tensor that `values` (a constant's lazy or loaded values) still is, if any."""
    if isinstance(values, ExternalValues):
        return values
    if isinstance(values, MappedWeights):
        return values.source
    return None


# Bits per element of the types ONNX packs several to a byte.
PACKED_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.FLOAT4E2M1: 4,
    onnx.TensorProto.INT2: 2,
    onnx.TensorProto.UINT2: 2,
    onnx.TensorProto.FLOAT6E2M3: 6,
    onnx.TensorProto.FLOAT6E3M2: 6,
}


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor's data takes in raw form (packed for sub-byte types), from its dims and type."""
    count = math.prod(tensor.dims)
    if tensor.data_type in PACKED_BITS:
        return (count * PACKED_BITS[tensor.data_type] + 7) // 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def confined_location(tensor_name: str, location: str, folder: Path) -> Path:
    """The real path of external data `location`, checked without opening anything to be a regular file in
    `folder` (a real path) reached through no symbolic link; ModelLoadError naming the tensor otherwise."""

    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(
            f"tensor '{tensor_name}': external data location {location!r} {why}; "
            "external data must lie in the model's folder"
        )

    if not location:
        raise ModelLoadError(f"tensor '{tensor_name}' uses external data but names no file")
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        raise refuse("holds a control character")
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise refuse("is an absolute path")
    if ".." in location.replace("\\", "/").split("/"):
        raise refuse("leads out of the folder ('..')")
    path, mode = folder, stat.S_IFDIR
    for part in (p for p in location.split("/") if p not in ("", ".")):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ModelLoadError(
                f"external data file '{location}' of tensor '{tensor_name}' not found in '{folder}': "
                "keep the data file next to the model"
            ) from None
        except OSError as exc:
            raise refuse(f"cannot be checked ({exc.strerror})") from None
        if stat.S_ISLNK(mode):
            link = path.relative_to(folder)
            raise refuse("is a symbolic link" if str(link) == location else f"goes through the symbolic link '{link}'")
    if not stat.S_ISREG(mode):
        raise refuse("is not a regular file")
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(folder):
        raise refuse("resolves outside the folder")
    return real


def _byte_count(tensor_name: str, info: dict[str, str], key: str, default: int) -> int:
    """External data's `offset` or `length`: a whole number of bytes, 0 or more."""
    if key not in info:
        return default
    text = info[key]
    if not (text.isascii() and text.isdigit()):
        raise ModelLoadError(
            f"tensor '{tensor_name}': external data {key} {text!r} is not a whole number of bytes (0 or more)"
        )
    return int(text)
