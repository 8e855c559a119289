"""Exporting a compiled model as an artifact: the shared library and the JSON that `loader.py` reads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import tvm
from onnx import helper

from onnxforge.backends.tvm.errors import one_line
from onnxforge.backends.tvm.loader import ARTIFACT_FORMAT, metadata_path
from onnxforge.backends.tvm.targets import TvmTarget, check_compiler
from onnxforge.errors import BackendError


@dataclass(frozen=True)
class Signature:
    """A model's inputs (name, static shape, numpy dtype name) and output names, in the order TVM takes them."""

    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    outputs: tuple[str, ...]

    @classmethod
    def of(cls, proto: onnx.ModelProto) -> Signature:
        """The signature of a model whose inputs have static shapes."""
        initializers = {t.name for t in proto.graph.initializer}
        inputs = tuple(
            (
                value.name,
                tuple(d.dim_value for d in value.type.tensor_type.shape.dim),
                helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
            )
            for value in proto.graph.input
            if value.name not in initializers
        )
        return cls(inputs, tuple(o.name for o in proto.graph.output))


def export_artifact(executable, target: TvmTarget, signature: Signature, path: str | os.PathLike,
                    cuda_graph: bool = False) -> list[Path]:
    """Write `path` (the library, linked for the target's machine) and its JSON beside it; returns both paths.
    `cuda_graph` is recorded in the JSON: whether the library replays its static launches as a CUDA graph.

    Both are written to temporary names first, so a failure leaves no half-written artifact.
    """
    library = Path(path)
    if library.suffix != ".so":
        raise BackendError(f"the artifact must be a .so file, got {library.name}")
    check_compiler(target)
    meta = {
        "format": ARTIFACT_FORMAT,
        "target": str(target.target),
        "target_name": target.name,
        "device": target.device,
        "machine": target.machine,
        "cuda_graph": cuda_graph,
        "tvm": tvm.__version__,
        "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in signature.inputs],
        "outputs": list(signature.outputs),
    }
    library.parent.mkdir(parents=True, exist_ok=True)
    described = metadata_path(library)
    tmp_library, tmp_described = library.with_name(f".{library.name}.tmp.so"), described.with_name(
        f".{described.name}.tmp"
    )
    try:
        try:
            executable.export_library(str(tmp_library), **({"cc": target.compiler} if target.compiler else {}))
        except Exception as exc:  # the linker's or TVM's own error types
            raise BackendError(f"TVM cannot export the library: {one_line(exc)}") from exc
        tmp_described.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_library, library)
        os.replace(tmp_described, described)
    finally:
        tmp_library.unlink(missing_ok=True)
        tmp_described.unlink(missing_ok=True)
    return [library, described]
