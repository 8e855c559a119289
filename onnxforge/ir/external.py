"""Weights stored in external data files, read through memory maps instead of into memory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.errors import ModelLoadError


class ExternalValues(LazyValues):
    """Lazy values of a tensor whose bytes lie in an external data file.

    The tensor's `location` is rewritten to an absolute path at load time, so the model can be saved
    anywhere (including over its own input file) by streaming bytes from the original file.
    """

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path):
        super().__init__(tensor)
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location")
        if not location:
            raise ModelLoadError(f"tensor '{tensor.name}' uses external data but names no file")
        self.path = (base_dir / location).resolve()
        self.offset = int(info.get("offset", 0))
        self.length = int(info["length"]) if "length" in info else None
        if not self.path.is_file():
            raise ModelLoadError(
                f"external data file '{self.path}' of tensor '{tensor.name}' not found: "
                "keep the data file next to the model"
            )
        expected = self.length if self.length is not None else int(self.nbytes)
        if self.path.stat().st_size < self.offset + expected:
            raise ModelLoadError(f"external data file '{self.path}' is truncated (tensor '{tensor.name}')")
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
        return self.length if self.length is not None else int(self.nbytes)

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
