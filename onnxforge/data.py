"""Sample inputs for a model: what it expects, random inputs, and samples read from `.npz` files."""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from onnxforge.errors import DataError

Dim = int | str | None
Sample = dict[str, np.ndarray]

_FLOAT_TYPES = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.DOUBLE,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E4M3FNUZ,
        TensorProto.FLOAT8E5M2,
        TensorProto.FLOAT8E5M2FNUZ,
    }
)
_BATCH_NAME = re.compile(r"^(n|b|bs)$|batch", re.IGNORECASE)
_SEQUENCE_WORDS = ("seq", "sequence", "len", "time", "frames", "tokens")
_SEQUENCE_DEFAULT = 16
# A random input larger than this is refused: a declared shape that large is a mistake or an attack.
RANDOM_INPUT_LIMIT_BYTES = 2**31


@dataclass
class InputSpec:
    """One graph input the caller must feed: name, numpy dtype, and shape.

    A dim is an int when fixed, a str when symbolic (`dim_param`), None when unknown;
    `shape` is None when the model does not give the input's rank. `elem_type` is the ONNX
    element type (`onnx.TensorProto.FLOAT`, ...), which tells bfloat16 and float8 apart.
    """

    name: str
    dtype: np.dtype
    shape: list[Dim] | None
    elem_type: int


def parse_shape_overrides(specs: Sequence[str]) -> dict[str, list[int]]:
    """Parse `--shape` values like `input=1x3x224x224` or `input=1,3,224,224` into name -> dims."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims_text = spec.strip().rpartition("=")
        name = name.strip()
        parts = re.split(r"[x,]", dims_text.strip())
        if not sep or not name or not all(p.strip().isdigit() for p in parts):
            raise DataError(
                f"cannot read shape {spec!r}: write it as NAME=1x3x224x224 or NAME=1,3,224,224 "
                "(non-negative integers)"
            )
        if name in shapes:
            raise DataError(f"shape of input {name!r} is given twice; give each input once")
        shapes[name] = [int(p) for p in parts]
    return shapes


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """List the graph inputs the caller must feed (initializer-backed inputs left out), in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise DataError(
                f"input {value.name!r} is a {value.type.WhichOneof('value')}, not a tensor; "
                "onnxforge can only feed tensor inputs"
            )
        tensor = value.type.tensor_type
        if tensor.elem_type == TensorProto.UNDEFINED:
            raise DataError(f"input {value.name!r} has no element type; fix the model's input declaration")
        shape = [_dim(d) for d in tensor.shape.dim] if tensor.HasField("shape") else None
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        specs.append(InputSpec(value.name, dtype, shape, tensor.elem_type))
    return specs


def random_inputs(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    batch: int | None = None,
) -> Sample:
    """Make one random input per graph input, reproducible from `seed`.

    Shapes come from the model. `shapes` overrides whole inputs; a symbolic dim that an override
    fixes takes the same value in every other input that uses that name. Remaining dynamic dims:
    a batch-like dim (named N, b, bs, batch, batch_size or containing "batch", or an unnamed first
    axis) gets `batch`, default 1; a dim whose name contains seq, sequence, len, time, frames or
    tokens gets 16; any other gets 1.
    Floats are standard normal, integers uniform in [0, 8), bools fair coin flips.
    """
    if batch is not None and batch < 1:
        raise DataError(f"batch must be 1 or more, got {batch}")
    specs = input_specs(model)
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise DataError(
            f"shape given for unknown input(s) {', '.join(sorted(unknown))}; "
            f"the model's inputs are: {', '.join(s.name for s in specs)}"
        )
    bound = _bind_symbols(specs, shapes)
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        if spec.name in shapes:
            shape = [int(d) for d in shapes[spec.name]]
        elif spec.shape is None:
            raise DataError(f"the model does not give the shape of input {spec.name!r}; give it with --shape")
        else:
            shape = [_default_dim(d, axis, bound, batch) for axis, d in enumerate(spec.shape)]
        _check_drawable(spec, shape)
        inputs[spec.name] = np.asarray(_random_array(spec, shape, rng))  # scalars as 0-d arrays
    return inputs


def _check_drawable(spec: InputSpec, shape: list[int]) -> None:
    """Refuse shapes no array can have, or whose random array would exceed RANDOM_INPUT_LIMIT_BYTES."""
    dims = "x".join(map(str, shape))
    if any(d < 0 for d in shape):
        raise DataError(f"input {spec.name!r} has a negative dimension ({dims}); fix the model's input declaration")
    nbytes = math.prod(shape) * spec.dtype.itemsize
    if nbytes > RANDOM_INPUT_LIMIT_BYTES:
        raise DataError(
            f"a random input {spec.name!r} of shape {dims} would take {nbytes / 2**30:.3g} GiB; "
            "give smaller dims with --shape NAME=DIMS or real samples with --data"
        )


def load_samples(path: str | os.PathLike[str], model: onnx.ModelProto) -> list[Sample]:
    """Read samples from an `.npz` file, or from every `.npz` in a folder in name order.

    Each file holds one array per model input, named after it, with samples along axis 0.
    Sample i is fed as `array[i:i+1]` when the model input has the array's rank (the samples
    axis is the batch axis) or no known rank, and as `array[i]` when it has one dim less.
    Arrays are cast to the input's dtype when the kind is kept (float64 -> float32 and int -> float
    are fine, integers must fit the input's integer type, float -> int is refused).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if not files:
            raise DataError(f"folder {path} holds no .npz files; put samples there as .npz files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"sample file {path} does not exist; give an .npz file or a folder of them")
    specs = input_specs(model)
    samples: list[Sample] = []
    for file in files:
        samples.extend(_samples_from_file(file, specs))
    if not samples:
        raise DataError(f"{path} holds no samples (arrays of length 0 along axis 0)")
    return samples


def split_samples(samples: Sequence[Sample], held_out_fraction: float = 0.25) -> tuple[list[Sample], list[Sample]]:
    """Split samples into a calibration part and a held-out part that judges fidelity (the last quarter).

    With fewer than 4 samples there is nothing to spare: both parts are all the samples.
    """
    samples = list(samples)
    if len(samples) < 4:
        return samples, samples
    held_out = max(1, round(len(samples) * held_out_fraction))
    return samples[:-held_out], samples[-held_out:]


def save_samples(path: str | os.PathLike[str], samples: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Write samples that keep the model's batch axis to one `.npz` that `load_samples` reads back."""
    if not samples:
        raise ValueError("no samples to save")
    names = list(samples[0])
    np.savez(path, **{name: np.concatenate([s[name] for s in samples], axis=0) for name in names})


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return dim.dim_value
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def _bind_symbols(specs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Check each override against the model and return the values it gives to symbolic dims."""
    bound: dict[str, int] = {}
    for spec in specs:
        if spec.name not in shapes:
            continue
        given = list(shapes[spec.name])
        if any(int(d) < 0 for d in given):
            raise DataError(f"shape {given} of input {spec.name!r} has a negative dim; dims must be >= 0")
        if spec.shape is None:
            continue
        if len(given) != len(spec.shape):
            raise DataError(
                f"shape {given} of input {spec.name!r} has rank {len(given)}, the model's is "
                f"{len(spec.shape)} ({_format_shape(spec.shape)}); give {len(spec.shape)} dims"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, given)):
            if isinstance(want, int) and want != got:
                raise DataError(
                    f"shape {given} of input {spec.name!r} sets axis {axis} to {got}, but the model "
                    f"fixes it at {want} ({_format_shape(spec.shape)})"
                )
            if isinstance(want, str):
                if bound.setdefault(want, int(got)) != got:
                    raise DataError(
                        f"dim {want!r} is {bound[want]} in one --shape and {got} in the shape of input "
                        f"{spec.name!r}; the model requires them equal"
                    )
    return bound


def _default_dim(dim: Dim, axis: int, bound: Mapping[str, int], batch: int | None) -> int:
    if isinstance(dim, int):
        return dim
    if dim in bound:
        return bound[dim]
    if _BATCH_NAME.search(dim or "") or (dim is None and axis == 0):
        return 1 if batch is None else batch
    if dim is not None and any(word in dim.lower() for word in _SEQUENCE_WORDS):
        return _SEQUENCE_DEFAULT
    return 1


def _random_array(spec: InputSpec, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if spec.elem_type in _FLOAT_TYPES:
        return rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
    if spec.elem_type == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if spec.dtype.kind in "iu" or spec.dtype.name.startswith(("int", "uint")):
        return rng.integers(0, 8, size=shape).astype(spec.dtype)
    raise DataError(
        f"cannot make random values for input {spec.name!r} of type {spec.dtype.name}; "
        "give real samples with --data"
    )


def _samples_from_file(file: Path, specs: list[InputSpec]) -> list[Sample]:
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read samples from {file}: {exc}; give an .npz written by numpy.savez") from exc
    expected = {s.name for s in specs}
    missing, extra = expected - set(arrays), set(arrays) - expected
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"no array for input(s) {', '.join(sorted(missing))}")
        if extra:
            problems.append(f"array(s) {', '.join(sorted(extra))} match no model input")
        raise DataError(
            f"{file}: {'; '.join(problems)}; name one array after each model input "
            f"({', '.join(s.name for s in specs)})"
        )
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        listed = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
        raise DataError(f"{file}: arrays must hold the same number of samples along axis 0 ({listed})")
    count = next(iter(counts.values()))
    fitted = {s.name: _fit_to_input(arrays[s.name], s, file) for s in specs}
    return [
        {name: array[i : i + 1] if keeps_axis else array[i] for name, (array, keeps_axis) in fitted.items()}
        for i in range(count)
    ]


def _fit_to_input(array: np.ndarray, spec: InputSpec, file: Path) -> tuple[np.ndarray, bool]:
    """Cast `array` to the input's dtype; tell whether each sample keeps axis 0 as its batch axis."""
    array = _cast(array, spec, file)
    rank = len(spec.shape) if spec.shape is not None else array.ndim
    if rank not in (array.ndim, array.ndim - 1):
        raise DataError(
            f"{file}: array {spec.name!r} has shape {array.shape}, which does not fit input rank {rank} "
            f"({_format_shape(spec.shape)}); store samples along axis 0, with or without the batch axis"
        )
    keeps_batch_axis = rank == array.ndim
    sample_shape = (1, *array.shape[1:]) if keeps_batch_axis else array.shape[1:]
    for axis, (want, got) in enumerate(zip(spec.shape or [], sample_shape)):
        if isinstance(want, int) and want != got:
            raise DataError(
                f"{file}: a sample of {spec.name!r} has shape {tuple(sample_shape)}, but the model fixes "
                f"axis {axis} at {want} ({_format_shape(spec.shape)})"
            )
    return array, keeps_batch_axis


def _cast(array: np.ndarray, spec: InputSpec, file: Path) -> np.ndarray:
    if array.dtype == spec.dtype:
        return array
    if spec.elem_type in _FLOAT_TYPES and array.dtype.kind in "biuf":
        return array.astype(spec.dtype)
    if spec.elem_type == TensorProto.STRING and array.dtype.kind in "US":
        return array.astype(object)
    if array.dtype.kind in "biu" and spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(spec.dtype)
    raise DataError(
        f"{file}: array {spec.name!r} has dtype {array.dtype}, the model input wants {spec.dtype}; "
        f"save it as {spec.dtype}"
    )


def _format_shape(shape: list[Dim] | None) -> str:
    if shape is None:
        return "rank unknown"
    return "x".join("?" if d is None else str(d) for d in shape)
