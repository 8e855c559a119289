"""The Python API: optimize a model with a list of passes and get the model back with its report."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.backends import get_backend
from onnxforge.backends.base import BackendOptions, Compiled, require_static_inputs
from onnxforge.comparison import Comparison, compare_outputs
from onnxforge.data import load_samples
from onnxforge.errors import DataError
from onnxforge.feeds import Feeds
from onnxforge.frontends import ModelFile, from_onnx
from onnxforge.ir import Model
from onnxforge.ir.model import PROTOBUF_LIMIT_BYTES
from onnxforge.ir.shapes import infer_shapes, skeleton_proto
from onnxforge.limits import DEFAULT_EXECUTION_TIMEOUT_S, bounded_in_time
from onnxforge.measure import InterleavedTiming, LatencyStats, MeasureOptions
from onnxforge.pipeline import (
    Instrument,
    Pass,
    PassContext,
    PassManager,
    VerifyOptions,
    create_passes,
    load_plugin,
)
from onnxforge.passes.cleanup.set_shapes import SetShapes, fix_input_shapes
from onnxforge.pipeline.budget import DEFAULT_BUDGET, Budget
from onnxforge.pipeline.decisions import Decisions
from onnxforge.pipeline.manager import OnError
from onnxforge.report import OptimizationReport

Samples = list[dict[str, np.ndarray]]


@bounded_in_time
def optimize(
    model: str | os.PathLike | onnx.ModelProto | bytes | Model | ModelFile,
    passes: str | Sequence[str | Pass] = "cleanup",
    *,
    data: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | Callable[[], Iterable[Mapping]] | None = None,
    budget: str | Budget | None = DEFAULT_BUDGET,
    shapes: Mapping[str, Sequence[int]] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    seed: int | None = None,
    on_error: OnError = "rollback",
    measure: bool = False,
    measure_options: MeasureOptions | None = None,
    backend: str = "ort",
    target: str = "cpu",
    threads: int | None = None,
    timing: InterleavedTiming | None = None,
    plugins: Sequence[str] = (),
    instruments: Sequence[Instrument] = (),
    backend_settings: Mapping[str, str] | None = None,
    decisions: str | os.PathLike | Mapping[str, Any] | None = None,
    timeout: float | None = None,
    pass_timeout: float | None = None,
    execution_timeout: float = DEFAULT_EXECUTION_TIMEOUT_S,
    step_back: bool = True,
) -> tuple[Model, OptimizationReport]:
    """Run `passes` on `model` and return the optimized model and the report of the run.

    data: sample inputs (an .npz, a folder of them, a list of input dicts, or a function returning an iterable
    of them) for passes that use data and for the report's error on real inputs.
    budget: how far the outputs may move from the original's, on the held-out samples of `data` (else on the
    verification inputs): "cosine=0.99,rel=0.05,top1=0.99,equal=0.99,metric=FILE.py:FUNCTION>=BOUND" in any
    combination, a Budget, or None / "none" for no bound. Lossy passes spend it and results outside it are
    stepped back (docs/budget.md). step_back: a lossy pass over its share of the budget is retried at its gentler
    settings (less pruned, a higher rank) and the strongest that fits is kept; False: it is rolled back at once
    (a search, which tries the settings itself).
    measure: time the model before and after on `backend`/`target`, with the backend's own `backend_settings`
    (for tvm: tune_trials, tune_records, rpc).
    timing: how passes time the models they choose between, and a lossy pass's result against the model before
    it (measure.InterleavedTiming's defaults).
    decisions: a report JSON of an earlier run (a path, or the report as a dict): its measured decisions are
    replayed instead of timed, and its verification seed is used unless `seed` is given, so the same input,
    passes and options give the same model byte for byte.
    timeout: the limit in seconds of the whole call (TimeLimitError past it); pass_timeout: of each pass (one
    that outlasts it is rolled back); execution_timeout: of each single model execution, even with neither.
    The input model is never modified.
    """
    # Refuse an unknown backend or target now, not only when verification or timing first needs it.
    runtime = get_backend(backend)
    runtime.check_target(target)
    for plugin in plugins:
        load_plugin(plugin)
    replay = None if decisions is None else Decisions.replay(decisions)
    if replay is not None and seed is None:
        seed = replay.seed
    original = from_onnx(model)
    as_loaded = _as_loaded(model)
    source = as_loaded if isinstance(as_loaded, str) else type(model).__name__
    pipeline = create_passes(passes)
    error_budget = Budget.parse(budget) if isinstance(budget, str) else budget
    shapes = _input_shapes(shapes, pipeline)
    samples = _samples(data, original)
    inputs_fixed = {}
    # On a backend that compiles static shapes only, the whole run (verification, timing, compile) works on the
    # model with its inputs fixed (to --shape, else to the first sample's), and so does the output; the file as
    # loaded is no baseline then.
    static = {**({name: list(np.shape(value)) for name, value in samples[0].items()} if samples else {}), **shapes}
    fixed = for_backend(original, backend, static)
    if fixed is not original:
        inputs_fixed = {t.name: list(t.shape) for t in fixed.graph.inputs if t.name in static}
        original, as_loaded = fixed, None
    feeds = Feeds(samples, dict(shapes or {}))
    verify_options = VerifyOptions(
        enabled=verify, rtol=rtol, seed=seed, shapes=shapes, backend=backend, threads=threads, data=samples,
        feeds=feeds,
    )
    context = PassContext(
        data=samples, backend=backend, target=target, threads=threads, timing=timing, decisions=replay, feeds=feeds
    )
    manager = PassManager(
        pipeline, verify=verify_options, on_error=on_error, instruments=instruments, context=context,
        pass_timeout=pass_timeout, budget=error_budget, step_back=step_back,
    )
    result, records = manager.run(original, as_loaded)
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
            "inputs": feeds.describe(),
        },
    )
    report.decisions = context.decisions.to_dict()
    if manager.tracker is not None:
        tracker = manager.tracker
        report.budget = {
            "bounds": tracker.budget.describe(),
            "default": isinstance(budget, str) and budget.strip() == DEFAULT_BUDGET,
            "measured_on": tracker.where,
            "score_outputs": list(tracker.budget.scores) if tracker.budget.scores is not None else None,
            "spent": tracker.spent,
            "fraction_spent": round(tracker.budget.spent(tracker.spent), 4),
        }
    report.budget_given = error_budget is not None
    report.inputs_made_constant = list(original.inputs_made_constant)
    if inputs_fixed:
        report.inputs_fixed = {"backend": runtime.name, "shapes": inputs_fixed}
    if manager.verifier:
        runner = manager.verifier
        report.error = compare_outputs(runner.reference_outputs, runner.run(result))
    if samples:
        held_out = context.calibration.split()[1]
        report.data_error = _error_on(held_out, as_loaded or original, result, backend)
        report.data_error_samples = {"held_out": len(held_out), "of": len(samples)}
    if measure:
        options = BackendOptions(target=target, threads=threads, extra=dict(backend_settings or {}))
        inputs = feeds.first(skeleton_proto(original), lambda: get_backend(backend).prepare(original).run)
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
    if runtime.capabilities.static_shapes:
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


def for_backend(model: Model, backend: str, shapes: Mapping[str, Sequence[int]] | None) -> Model:
    """`model` as `backend` takes it: for one that compiles static shapes only, a copy with its inputs fixed to
    `shapes` (BackendError naming every dynamic dim left, and the --shape to pass); for others, `model` itself."""
    runtime = get_backend(backend)
    if not runtime.capabilities.static_shapes:
        return model
    fixed = with_input_shapes(model, shapes or {})
    require_static_inputs(skeleton_proto(fixed), runtime.name)
    return fixed


def with_input_shapes(model: Model, shapes: Mapping[str, Sequence[int]]) -> Model:
    """A copy of `model` whose inputs named in `shapes` have those shapes, the graph's shapes inferred from them
    (the model itself if none changes); DataError for a shape that does not fit the model."""
    if not shapes:
        return model
    fixed = model.copy()
    if not fix_input_shapes(fixed, shapes):
        return model
    infer_shapes(fixed)
    return fixed


def _input_shapes(shapes: Mapping[str, Sequence[int]] | None, pipeline: Sequence[Pass]) -> dict[str, list[int]]:
    """The input shapes a run feeds: `shapes` (--shape) and those every set-shapes pass fixes, since the model
    after it takes no other; DataError where the two disagree."""
    merged = {name: list(dims) for name, dims in (shapes or {}).items()}
    for pass_ in pipeline:
        if isinstance(pass_, SetShapes):
            for name, dims in pass_.options.shapes.items():
                if merged.setdefault(name, list(dims)) != list(dims):
                    given = "x".join(map(str, merged[name]))
                    raise DataError(
                        f"--shape {name}={given} and {pass_.describe()} disagree; give the shape of {name} once"
                    )
    return merged


def _samples(data: Any, model: Model) -> Samples | None:
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return load_samples(Path(data), skeleton_proto(model))
    if callable(data):  # a function that yields samples, such as a calibration data reader
        data = data()
    return [dict(sample) for sample in data]


def _as_loaded(model: Any) -> str | bytes | None:
    """The input as a runtime loads it (a file path or serialized bytes), the baseline of every comparison;
    None for an in-memory Model or a proto too large to serialize."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, ModelFile):
        return str(model.path)
    if isinstance(model, bytes):
        return model
    if isinstance(model, onnx.ModelProto) and model.ByteSize() < PROTOBUF_LIMIT_BYTES:
        return model.SerializeToString()
    return None


def _error_on(samples: Samples, original: Model | str | bytes, result: Model, backend: str) -> Comparison:
    before = get_backend(backend).prepare(original)
    after = get_backend(backend).prepare(result)
    return compare_outputs([before.run(s) for s in samples], [after.run(s) for s in samples])
