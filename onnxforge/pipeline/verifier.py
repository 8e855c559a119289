"""Checks a model after a pass: valid ONNX, loadable by the backend, and (for lossless passes) same outputs."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxforge.backends import get_backend
from onnxforge.backends.base import Backend, BackendOptions
from onnxforge.comparison import Comparison, compare_outputs
from onnxforge.data import input_specs
from onnxforge.errors import BackendError, DataError, ModelLoadError, OnnxforgeError
from onnxforge.feeds import Feeds
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.ir.validity import check_model

Outputs = list[dict[str, np.ndarray]]
# How many steps of float16 / bfloat16 a lossless pass may move a half-precision model's outputs by
# (see lossless_tolerance); a step is 2**-10 of the value in float16, 2**-7 in bfloat16.
HALF_PRECISION_ULPS = 4
_HALF_STEPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


@dataclass
class VerifyOptions:
    """How the pass manager checks each pass.

    rtol bounds max|new - old| / max|old| per output for lossless passes. The checks run on the last `samples`
    of `data` (real inputs) when given, else on `samples` random input sets drawn once per run from `seed`
    (a fresh seed when None), with dynamic dims taken from `shapes` or found by running the model. `feeds`, when
    given, decides those inputs instead of `data` and `shapes` (the run's one `Feeds`, shared with the passes).
    Models run on `backend` with the run's `threads`, for the host CPU whatever the run's target: a model built
    for another device or board could not run here to be checked.
    """

    enabled: bool = True
    rtol: float = 1e-4
    samples: int = 2
    seed: int | None = None
    shapes: Mapping[str, Sequence[int]] | None = None
    backend: str = "ort"
    threads: int | None = None
    data: Sequence[Mapping[str, np.ndarray]] | None = None
    feeds: Feeds | None = None


@dataclass
class Verdict:
    """The outcome of checking one model: ok, or the one-line reason why not, with the output comparison."""

    ok: bool
    reason: str = ""
    outputs: Outputs = field(default_factory=list)
    comparison: Comparison | None = None


class Verifier:
    """Runs a model on fixed inputs (real or random) and compares it with the last accepted model's outputs."""

    def __init__(self, options: VerifyOptions, backend: Backend | None = None):
        self.options = options
        self.backend = backend or get_backend(options.backend)
        self.seed = options.seed if options.seed is not None else random.randrange(2**31)
        self.feeds = options.feeds if options.feeds is not None else Feeds(options.data, options.shapes)
        self.inputs: list[dict[str, np.ndarray]] = []
        self.reference_outputs: Outputs = []

    def reference(self, model: Model, source: str | bytes | None = None) -> Outputs:
        """Take this run's inputs (real samples, or random ones drawn from `model`'s input shapes) and return
        the reference outputs on them.

        With `source` (the original file's path, or its serialized bytes) the reference comes from the model as
        the backend loads it, not from the imported copy, and the copy must compute the same outputs: an import
        that changed the model's meaning is an error, not a silently different baseline.
        """
        proto = skeleton_proto(model)
        options = BackendOptions(threads=self.options.threads)
        prepared = self.backend.prepare(model if source is None else source, options)
        self.feeds.resolve(proto, prepared.run, self.seed)
        self.inputs = self.feeds.inputs(proto, self.options.samples, self.seed)
        try:
            self.reference_outputs = [prepared.run(sample) for sample in self.inputs]
        except BackendError as exc:
            if "cannot run" not in str(exc) or self.feeds.samples:
                raise
            shapes = ", ".join(f"{name}={'x'.join(map(str, x.shape))}" for name, x in self.inputs[0].items())
            raise BackendError(
                f"the input model fails on random inputs ({shapes}): {exc}; "
                "fix dynamic dims with --shape NAME=DIMS or verify on real samples with --data"
            ) from None
        never_finite = _never_finite(self.reference_outputs)
        if never_finite:
            where, what = (
                ("on the samples given", "check the samples") if self.feeds.samples
                else ("on random inputs", "give inputs it computes on with --data")
            )
            raise DataError(
                f"the model's output {', '.join(never_finite)} is NaN or infinite everywhere {where}: verification "
                f"would compare nothing; {what}"
            )
        if source is not None:
            self._check_import(model, source)
        return self.reference_outputs

    def _check_import(self, model: Model, source: str | bytes) -> None:
        """Raise ModelLoadError unless the imported `model` gives the original file's outputs (within rtol)."""
        try:
            imported = self.run(model)
        except BackendError as exc:
            raise ModelLoadError(f"the model no longer loads once imported: {exc}") from None
        comparison = compare_outputs(self.reference_outputs, imported)
        if not comparison.within(self.options.rtol) and self._deterministic(source):
            raise ModelLoadError(
                f"the model changes its outputs when imported (relative error {comparison.max_rel:.3g}): "
                "it is not valid ONNX in a way onnxforge cannot keep; check it with onnx.checker"
            )

    def run(self, model: Model | str | bytes) -> Outputs:
        """Outputs of `model` (or a model file's path or bytes) on this run's inputs, cast to the float types
        its inputs declare.

        A pass may change an input's float type (fp16 without keep_io_types): it gets the same values.
        """
        inputs = as_declared(model, self.inputs) if isinstance(model, Model) else self.inputs
        prepared = self.backend.prepare(model, BackendOptions(threads=self.options.threads))
        return [prepared.run(sample) for sample in inputs]

    def check(self, model: Model, reference: Outputs, lossless: bool) -> Verdict:
        """Check `model` after a pass; `reference` are the outputs of the model before it."""
        try:
            check_model(model)
            outputs = self.run(model)
        except onnx.checker.ValidationError as exc:
            return Verdict(False, f"invalid ONNX: {_first_line(exc)}")
        except OnnxforgeError as exc:
            return Verdict(False, str(exc))
        comparison = compare_outputs(reference, outputs)
        rtol = lossless_tolerance(model, self.options.rtol)
        if lossless and not comparison.within(rtol):
            return Verdict(
                False,
                f"outputs changed: relative error {comparison.max_rel:.3g} > {rtol:g}",
                outputs,
                comparison,
            )
        return Verdict(True, "", outputs, comparison)


    def _deterministic(self, source: str | bytes) -> bool:
        """Whether the original gives the same outputs twice (random ops make it differ from itself)."""
        return compare_outputs(self.reference_outputs, self.run(source)).within(self.options.rtol)


def lossless_tolerance(model: Model, rtol: float) -> float:
    """The relative error a lossless pass may cause on `model`: `rtol`, or where the model computes in float16
    or bfloat16, HALF_PRECISION_ULPS steps of that type if more.

    A lossless rewrite of a half-precision model still rounds differently (onnxruntime runs another kernel
    after upgrade-opset, a fused op rounds once where its parts rounded each step): a step of float16 is
    1e-3 of the value, ten times the default rtol, so that bound would roll back every such pass.
    """
    widest_step = max((_HALF_STEPS.get(dtype, 0.0) for dtype in _dtype_names(model)), default=0.0)
    return max(rtol, HALF_PRECISION_ULPS * widest_step)


def _dtype_names(model: Model) -> set[str]:
    """The names of the dtypes of every tensor whose type is known, nested graphs included."""
    names = set()
    for graph in model.graphs():
        for tensor in graph.tensors().values():
            if tensor.dtype is not None and not isinstance(tensor.dtype, int):
                names.add(np.dtype(tensor.dtype).name)
    return names


def _never_finite(outputs: Outputs) -> list[str]:
    """The float outputs with no finite value in any run (an empty one has nothing to compare either way)."""
    def float_array(value) -> bool:
        return isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size > 0

    names = outputs[0].keys() if outputs else []
    return [
        name for name in names
        if all(float_array(run[name]) for run in outputs) and not any(np.isfinite(run[name]).any() for run in outputs)
    ]


def as_declared(model: Model, samples: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """`samples` with float values cast to the float types `model`'s inputs declare (a pass may change an input's
    float type: fp16 without keep_io_types)."""
    cast = caster(model)
    return [cast(sample) for sample in samples]


def caster(model: Model) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A function casting one sample as `as_declared` does, `model`'s input types read once."""
    dtypes = {spec.name: spec.dtype for spec in input_specs(skeleton_proto(model))}
    return lambda sample: {name: _as_declared(value, dtypes.get(name)) for name, value in sample.items()}


def _as_declared(value: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or value.dtype == dtype or value.dtype.kind != "f" or np.dtype(dtype).kind != "f":
        return value
    return value.astype(dtype)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
