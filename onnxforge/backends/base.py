"""The interface every backend implements: prepare a model, run it, time it."""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import onnx

from onnxforge.errors import BackendError, ModelLoadError
from onnxforge.ir.runtime_source import RuntimeSource
from onnxforge.measure import LatencyStats, MeasureOptions, measure_latency

GraphOptimization = Literal["disable", "basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]


@runtime_checkable
class HasRuntimeSource(Protocol):
    """A model (such as `onnxforge.ir.Model`) that hands a runtime what to load within a context: a RuntimeSource
    (or another form of ModelInput)."""

    def runtime_source(self) -> AbstractContextManager[RuntimeSource | bytes | str]: ...


ModelInput = RuntimeSource | onnx.ModelProto | bytes | str | os.PathLike[str] | HasRuntimeSource


@dataclass(frozen=True)
class BackendOptions:
    """How a backend should prepare a model.

    `threads=None` keeps the library's default (one thread per physical core for onnxruntime).
    `allow_spinning=False` makes idle worker threads sleep instead of spinning: when two models
    are timed interleaved in one process, a spinning pool steals cores from the other and makes
    the speed ratio wrong and unstable (benchmarks/README.md, "How two models are timed in one process").
    `execution_mode="parallel"` runs independent branches of the graph at the same time (onnxruntime: on a pool
    of inter-op threads of its default size); "sequential" runs one node at a time, each on the `threads`.
    `extra` holds backend-specific settings (session config entries for onnxruntime).
    """

    target: str = "cpu"
    threads: int | None = None
    graph_optimization: GraphOptimization = "all"
    allow_spinning: bool = False
    execution_mode: ExecutionMode = "sequential"
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise BackendError(f"threads must be 1 or more, got {self.threads}; leave it unset for the default")
        if self.graph_optimization not in ("disable", "basic", "extended", "all"):
            raise BackendError(
                f"unknown graph optimization level {self.graph_optimization!r}; "
                "use one of disable, basic, extended, all"
            )
        if self.execution_mode not in ("sequential", "parallel"):
            raise BackendError(f"unknown execution mode {self.execution_mode!r}; use sequential or parallel")


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can run, for passes to ask (through `PassContext.capabilities`) instead of its name.

    contrib_ops: the onnxruntime contrib ops (domain com.microsoft: Attention, SkipLayerNormalization, BiasGelu,
    FastGelu, MatMulNBits, QLinear*, ...) the backend runs. static_shapes: it compiles for fixed input shapes
    only, so a model's dynamic input dims must be fixed (`set-shapes`, `--shape`) before it can run.
    seven_bit_int8_weights: its uint8 x int8 kernels add pairs of products in 16 bits (x86 without VNNI), which
    overflow unless int8 weights keep to 7 bits.
    """

    contrib_ops: frozenset[str] = frozenset()
    static_shapes: bool = False
    seven_bit_int8_weights: bool = False

    def runs_contrib_ops(self, *op_types: str) -> bool:
        """Whether the backend runs every one of these com.microsoft ops."""
        return all(op in self.contrib_ops for op in op_types)


class Prepared(abc.ABC):
    """A model loaded or compiled by a backend, ready to run on its target."""

    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once and return its outputs by name."""

    def measure(self, inputs: Mapping[str, np.ndarray], options: MeasureOptions = MeasureOptions()) -> LatencyStats:
        """Time repeated runs on `inputs` and return their latency statistics."""
        return measure_latency(lambda: self.run(inputs), options)


class Compiled(abc.ABC):
    """A model compiled ahead of time for one target."""

    @abc.abstractmethod
    def export(self, path: str | os.PathLike) -> list[Path]:
        """Write the compiled model as an artifact at `path` (and any files it needs beside it); returns them."""


class Backend(abc.ABC):
    """A runtime that can prepare ONNX models for one or more targets, and says what it can run (`capabilities`).

    `get_backend` gives one object per backend to every caller and every name of it: keep no per-run state.
    """

    name: str
    targets: tuple[str, ...]
    capabilities: BackendCapabilities = BackendCapabilities()

    @abc.abstractmethod
    def prepare(self, model: ModelInput, options: BackendOptions | None = None) -> Prepared:
        """Load or compile `model` for `options.target` and return it ready to run."""

    def compile(self, model: ModelInput, options: BackendOptions | None = None,
                progress: Callable[[str], None] | None = None) -> Compiled:
        """Compile `model` ahead of time for `options.target`, to export it or load it later; `progress` gets
        a line now and then during long steps (tuning). Backends that compile as they load cannot."""
        raise BackendError(
            f"backend {self.name!r} does not compile models ahead of time (no artifacts); use --backend tvm"
        )

    def load(self, compiled: Compiled, options: BackendOptions | None = None) -> Prepared:
        """Load what `compile` made, ready to run (here, or where `options` points)."""
        raise BackendError(f"backend {self.name!r} does not compile models ahead of time")

    def check_target(self, target: str) -> None:
        """Raise BackendError unless this backend can prepare models for `target`."""
        if target not in self.targets:
            raise BackendError(
                f"backend {self.name!r} has no target {target!r}; choose one of: {', '.join(self.targets)}"
            )


def require_static_inputs(proto: onnx.ModelProto, backend: str) -> None:
    """One BackendError naming every input of `proto` with a dynamic dim, and the --shape that would fix each,
    for a `backend` that compiles static shapes only."""
    dynamic = []
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            shown = [str(d.dim_value) if d.HasField("dim_value") else f"<{d.dim_param or '?'}>" for d in dims]
            dynamic.append(f"{value.name}={'x'.join(shown)}")
    if dynamic:
        raise BackendError(
            f"{backend} compiles for static input shapes, and the model's inputs have dynamic dims: pass "
            f"{' '.join('--shape ' + spec for spec in dynamic)} with a number for each <dim> "
            "(or fix them in the model with set-shapes:NAME=DIMS)"
        )


@contextmanager
def model_source(model: ModelInput) -> Iterator[RuntimeSource]:
    """Yield `model` as a RuntimeSource: serialized bytes, the folder its external data lies in, weights given
    in memory. A file's bytes are read here; its external data is left to the runtime's own checks."""
    if isinstance(model, RuntimeSource):
        yield model
    elif isinstance(model, HasRuntimeSource):
        with model.runtime_source() as given, model_source(given) as source:
            yield source
    elif isinstance(model, onnx.ModelProto):
        yield RuntimeSource(model.SerializeToString())
    elif isinstance(model, bytes):
        yield RuntimeSource(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist; check the path")
        yield RuntimeSource(path.read_bytes(), Path(os.path.realpath(path.parent)))
    else:
        raise TypeError(f"cannot load a model from {type(model).__name__}")
