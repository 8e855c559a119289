"""Sample inputs for a model: what it expects, random inputs, and samples read from `.npz` files."""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
_SAMPLE_RATE_NAME = re.compile(r"^(sr|fs)$|sampl\w*_?rate|^rate$", re.IGNORECASE)
SAMPLE_RATES = (16000, 8000)  # what a scalar sample-rate input gets, the first by default
RANDOM_INTEGER_HIGH = 8  # random integers are drawn below this (or below the table they index, if smaller)
# An integer mask of 0 and 1 (BERT's attention_mask): other values turn the additive mask into inf, then NaN.
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)
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
    Floats are standard normal, integers uniform in [0, 8) (small enough to index most vocabularies), or below the
    length of the smallest constant table the input indexes (`index_limits`: BERT's 2 token types), 0 or 1 when
    named like a mask, bools fair coin flips; an integer scalar named like a sample rate (sr, fs, sample_rate,
    sampling_rate) is 16000.
    """
    if batch is not None and batch < 1:
        raise DataError(f"batch must be 1 or more, got {batch}")
    specs = input_specs(model)
    shapes = dict(shapes or {})
    bound = check_shapes(specs, shapes)
    limits = index_limits(model)
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
        if is_sample_rate(spec, shape):
            inputs[spec.name] = np.full(shape, SAMPLE_RATES[0], dtype=spec.dtype)
        else:
            high = min(RANDOM_INTEGER_HIGH, limits.get(spec.name, RANDOM_INTEGER_HIGH))
            if _MASK_NAME.search(spec.name):
                high = 2
            inputs[spec.name] = np.asarray(_random_array(spec, shape, rng, high))  # scalars as 0-d arrays
    return inputs


def index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs that index a constant table: input name -> the table's length along the gathered axis (the
    shortest, when an input indexes several). A table is a weight or a Constant read by Gather, the input being
    its indices directly or through Cast."""
    graph = model.graph
    tables = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tables[node.output[0]] = list(value.dims)
    sources = {value.name: value.name for value in graph.input if value.name not in tables}
    for node in graph.node:  # toposorted: a Cast's input is resolved before the Cast
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and node.input[0] in sources:
            sources[node.output[0]] = sources[node.input[0]]
    limits: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        data, indices = node.input[0], node.input[1]
        if indices not in sources or data not in tables or not tables[data]:
            continue
        dims = tables[data]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if -len(dims) <= axis < len(dims) and dims[axis] > 0:
            name = sources[indices]
            limits[name] = min(limits.get(name, dims[axis]), dims[axis])
    return limits


def is_sample_rate(spec: InputSpec, shape: Sequence[int]) -> bool:
    """Whether an input of `shape` looks like a sample rate: an integer scalar (or single value) named like one."""
    return spec.dtype.kind in "iu" and math.prod(shape) == 1 and bool(_SAMPLE_RATE_NAME.search(spec.name))


def is_batch_dim(dim: Dim, axis: int) -> bool:
    """Whether a dynamic dim is a batch axis: named N, b, bs or like batch, or an unnamed first axis."""
    return bool(_BATCH_NAME.search(dim or "")) or (dim is None and axis == 0)


def default_dim(dim: Dim, axis: int, batch: int | None = None) -> int:
    """The value random inputs give a dynamic dim by default (see `random_inputs`)."""
    if isinstance(dim, int):
        return dim
    if is_batch_dim(dim, axis):
        return 1 if batch is None else batch
    if dim is not None and any(word in dim.lower() for word in _SEQUENCE_WORDS):
        return _SEQUENCE_DEFAULT
    return 1


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

    Each file holds one array per model input, named after it, and is read one of two ways, decided by the
    ranks of its arrays against the inputs' ranks (inputs of unknown rank follow the others):
    - a stack: every array has one axis more than its input; axis 0 indexes the samples (N x input shape);
    - one feed: every array has its input's rank and is fed exactly as it is.
    A file whose arrays disagree (some stacked, some not), or an array that fits neither reading, is a
    DataError naming the array. Arrays are cast to the input's dtype when the kind is kept (float64 -> float32
    and int -> float are fine, integers must fit the input's integer type, float -> int is refused).
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
        raise DataError(f"{path} holds no samples (stacked arrays of length 0 along axis 0)")
    return samples


def save_samples(
    path: str | os.PathLike[str],
    samples: Sequence[Mapping[str, np.ndarray]],
    layout: Literal["stacked", "folder"] = "stacked",
) -> None:
    """Write feeds (dicts of input name -> array, each exactly as the model takes it) for `load_samples`.

    layout="stacked": one `.npz` whose arrays stack the feeds along a new axis 0 (every feed must have the
    same shapes); layout="folder": a new or empty folder with one `.npz` per feed (000000.npz, ...), for
    feeds of different shapes.
    """
    if not samples:
        raise DataError("no samples to save")
    names = list(samples[0])
    for index, sample in enumerate(samples):
        if list(sample) != names:
            raise DataError(f"sample {index} has inputs {', '.join(sample)}, sample 0 has {', '.join(names)}")
    if layout == "folder":
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        if any(p.suffix == ".npz" for p in folder.iterdir()):
            raise DataError(f"folder {folder} already holds .npz files; save samples into a new or empty folder")
        for index, sample in enumerate(samples):
            np.savez(folder / f"{index:06d}.npz", **{name: np.asarray(value) for name, value in sample.items()})
        return
    if layout != "stacked":
        raise DataError(f"unknown layout {layout!r}: choose 'stacked' or 'folder'")
    arrays = {}
    for name in names:
        values = [np.asarray(sample[name]) for sample in samples]
        shapes = {value.shape for value in values}
        if len(shapes) > 1:
            raise DataError(
                f"input {name!r} has shapes {', '.join(map(str, sorted(shapes)))} across samples, which cannot be "
                "stacked; save them with layout='folder' (one file per sample)"
            )
        arrays[name] = np.stack(values)
    np.savez(path, **arrays)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    # Older exporters (Paddle2ONNX, early TensorFlow converters) declare a dynamic dim as -1; onnxruntime runs
    # such an input at any size, so it is an unknown dim here too. Other negative dims stay an error.
    if dim.HasField("dim_value"):
        return None if dim.dim_value == -1 else dim.dim_value
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def check_shapes(specs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Check `--shape` overrides against the model's inputs (names, ranks, fixed dims, dims named alike agree);
    return the values they give to symbolic dims. DataError naming the problem."""
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise DataError(
            f"shape given for unknown input(s) {', '.join(sorted(unknown))}; "
            f"the model's inputs are: {', '.join(s.name for s in specs)}"
        )
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
    if isinstance(dim, str) and dim in bound:
        return bound[dim]
    return default_dim(dim, axis, batch)


def _random_array(spec: InputSpec, shape: list[int], rng: np.random.Generator, high: int) -> np.ndarray:
    if spec.elem_type in _FLOAT_TYPES:
        return rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
    if spec.elem_type == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if spec.dtype.kind in "iu" or spec.dtype.name.startswith(("int", "uint")):
        return rng.integers(0, high, size=shape).astype(spec.dtype)
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
    arrays = {s.name: _cast(arrays[s.name], s, file) for s in specs}
    if not _is_stack(file, arrays, specs):
        for spec in specs:
            _check_fixed_dims(file, spec, arrays[spec.name].shape, "the feed")
        return [arrays]
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise DataError(f"{file}: stacked arrays must hold the same number of samples along axis 0 ({listed})")
    for spec in specs:
        _check_fixed_dims(file, spec, arrays[spec.name].shape[1:], "a stacked sample")
    count = next(iter(counts.values()), 0)
    return [{name: np.asarray(array[i]) for name, array in arrays.items()} for i in range(count)]  # 0-d stays an array


def _is_stack(file: Path, arrays: Mapping[str, np.ndarray], specs: list[InputSpec]) -> bool:
    """Whether the file stacks samples along a new axis 0 (True) or is one feed (False), from the arrays whose
    input has a known rank; a DataError names an array that fits neither reading, or two that disagree."""
    readings: dict[bool, str] = {}
    for spec in specs:
        if spec.shape is None:
            continue
        array, rank = arrays[spec.name], len(spec.shape)
        if array.ndim not in (rank, rank + 1):
            raise DataError(
                f"{file}: array {spec.name!r} has shape {array.shape}, which fits input {spec.name!r} "
                f"({_format_shape(spec.shape)}) neither as one feed (rank {rank}) nor as a stack of samples "
                f"(rank {rank + 1}: N x {_format_shape(spec.shape)})"
            )
        readings.setdefault(array.ndim == rank + 1, spec.name)
    if len(readings) > 1:
        raise DataError(
            f"{file}: array {readings[True]!r} has one axis more than its input (a stack of samples) but array "
            f"{readings[False]!r} has its input's rank (one feed); store every array of a file the same way: "
            "N x input shape for N samples (onnxforge.data.save_samples), or each exactly as the model takes it"
        )
    return readings.get(True, False)


def _check_fixed_dims(file: Path, spec: InputSpec, shape: tuple[int, ...], what: str) -> None:
    for axis, (want, got) in enumerate(zip(spec.shape or [], shape)):
        if isinstance(want, int) and want != got:
            hint = ""
            if what == "the feed" and axis == 0:
                hint = (
                    f"; if axis 0 counts samples, stack them on a new axis instead "
                    f"(N x {_format_shape(spec.shape)}, as onnxforge.data.save_samples writes)"
                )
            raise DataError(
                f"{file}: {what} of {spec.name!r} has shape {tuple(shape)}, but the model fixes axis {axis} "
                f"at {want} ({_format_shape(spec.shape)}){hint}"
            )


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
