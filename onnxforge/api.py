"""The Python API: optimize a model with a list of passes and get the model back with its report."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.backends import get_backend
from onnxforge.backends.base import BackendOptions, Compiled
from onnxforge.data import load_samples, random_inputs
from onnxforge.frontends import from_onnx
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import LatencyStats, MeasureOptions
from onnxforge.passes import (
    Instrument,
    Pass,
    PassContext,
    PassManager,
    VerifyOptions,
    create_passes,
    load_plugin,
)
from onnxforge.report import OptimizationReport
from onnxforge.verify import compare_outputs

Samples = list[dict[str, np.ndarray]]


def optimize(
    model: str | os.PathLike | onnx.ModelProto | bytes | Model,
    passes: str | Sequence[str | Pass] = "cleanup",
    *,
    data: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | Callable[[], Iterable[Mapping]] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    seed: int | None = None,
    on_error: str = "rollback",
    measure: bool = False,
    measure_options: MeasureOptions | None = None,
    backend: str = "ort",
    target: str = "cpu",
    threads: int | None = None,
    plugins: Sequence[str] = (),
    instruments: Sequence[Instrument] = (),
    backend_settings: Mapping[str, str] | None = None,
) -> tuple[Model, OptimizationReport]:
    """Run `passes` on `model` and return the optimized model and the report of the run.

    data: sample inputs (an .npz, a folder of them, a list of input dicts, or a function returning an iterable
    of them) for passes that use data and for the report's error on real inputs.
    measure: time the model before and after on `backend`/`target`, with the backend's own `backend_settings`
    (for tvm: tune_trials, tune_records, rpc).
    The input model is never modified.
    """
    # Refuse an unknown backend or target now, not only when verification or timing first needs it.
    get_backend(backend).check_target(target)
    for plugin in plugins:
        load_plugin(plugin)
    source = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    original = from_onnx(model)
    pipeline = create_passes(passes)
    samples = _samples(data, original)
    verify_options = VerifyOptions(
        enabled=verify, rtol=rtol, seed=seed, shapes=shapes, backend=backend, data=samples
    )
    context = PassContext(data=samples, backend=backend, target=target, threads=threads)
    manager = PassManager(pipeline, verify=verify_options, on_error=on_error, instruments=instruments, context=context)
    result, records = manager.run(original)
    report = OptimizationReport(
        source=source,
        before=original.stats(),
        after=result.stats(),
        passes=records,
        verification={
            "enabled": verify,
            "rtol": rtol,
            "seed": manager.verifier.seed if manager.verifier else None,
            "samples": verify_options.samples,
            "metric": "max|new - old| / max|old| per output, on " + ("--data samples" if samples else "random inputs"),
        },
    )
    if manager.verifier:
        runner = manager.verifier
        report.error = compare_outputs(runner.reference_outputs, runner.run(result))
    if samples:
        report.data_error = _error_on(samples, original, result, backend)
    if measure:
        options = BackendOptions(target=target, threads=threads, extra=dict(backend_settings or {}))
        inputs = samples[0] if samples else random_inputs(skeleton_proto(original), shapes=shapes, seed=0)
        report.latency_before = measure_model(original, inputs, backend, options, measure_options)
        report.latency_after = measure_model(result, inputs, backend, options, measure_options)
        report.latency_setup = {
            "backend": backend,
            "target": target,
            "threads": threads,
            "description": f"{backend} {target}, each model timed in its own block, thread spinning off",
        }
    return result, report


def measure_model(
    model: Model,
    inputs: Mapping[str, np.ndarray],
    backend: str,
    options: BackendOptions,
    measure_options: MeasureOptions | None = None,
    artifact: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyStats:
    """Prepare `model` on a backend and time it on `inputs` (bound to their shapes if the backend compiles
    for static shapes only). With `artifact`, the compiled model is also exported there (backends that
    compile ahead of time only); `progress` gets lines during long compiles (tuning)."""
    runtime = get_backend(backend)
    if runtime.static_shapes:
        model = with_input_shapes(model, {name: np.shape(value) for name, value in inputs.items()})
    if artifact is None and progress is None:
        prepared = runtime.prepare(model, options)
    else:
        compiled = runtime.compile(model, options, progress)
        if artifact is not None:
            compiled.export(artifact)
        prepared = runtime.load(compiled, options)
    return prepared.measure(inputs, measure_options or MeasureOptions())


def compile_model(
    model: Model,
    backend: str,
    options: BackendOptions,
    shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Compiled:
    """Compile `model` ahead of time on a backend that can (tvm), its inputs bound to `shapes` where given."""
    return get_backend(backend).compile(with_input_shapes(model, shapes or {}), options, progress)


def with_input_shapes(model: Model, shapes: Mapping[str, Sequence[int]]) -> Model:
    """A copy of `model` whose inputs named in `shapes` have those shapes (the model itself if none)."""
    if not shapes:
        return model
    model = model.copy()
    for tensor in model.graph.inputs:
        if tensor.name in shapes:
            tensor.shape = list(shapes[tensor.name])
    return model


def _samples(data: Any, model: Model) -> Samples | None:
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return load_samples(Path(data), skeleton_proto(model))
    if callable(data):  # a function that yields samples, such as a calibration data reader
        data = data()
    return [dict(sample) for sample in data]


def _error_on(samples: Samples, original: Model, result: Model, backend: str):
    before = get_backend(backend).prepare(original)
    after = get_backend(backend).prepare(result)
    return compare_outputs([before.run(s) for s in samples], [after.run(s) for s in samples])
