"""Apache TVM (Relax) as an onnxforge backend: import the ONNX model, compile it for the target (tuned or with
TVM's default schedules), run it on TVM's VM here, export it for another machine."""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxforge.backends.base import (
    Backend,
    BackendCapabilities,
    BackendOptions,
    Compiled,
    ModelInput,
    Prepared,
    model_source,
    require_static_inputs,
)
from onnxforge.errors import BackendError
from onnxforge.measure import LatencyStats, MeasureOptions, latency_stats_from_times

try:
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
except ImportError as exc:  # get_backend turns this into a one-line error naming the package
    raise ModuleNotFoundError(f"apache-tvm (pip install 'onnxforge[tvm]'): {exc}") from exc

from onnxforge.backends.tvm.artifact import Signature, export_artifact
from onnxforge.backends.tvm.errors import one_line
from onnxforge.backends.tvm.targets import TARGET_NAMES, TvmTarget, resolve_target

if TYPE_CHECKING:
    from onnxforge.backends.tvm.tuning import TuningOptions


# TVM's importer keys its converters by op name alone; these names convert onnxruntime's contrib ops
# (com.microsoft), not the standard ops of the same name (ONNX's own Attention, opset 23, has other inputs).
CONTRIB_CONVERTERS = frozenset(
    {"Attention", "BiasGelu", "EmbedLayerNormalization", "FastGelu", "SkipLayerNormalization"}
)


class TvmBackend(Backend):
    """Compile models with TVM Relax for `cpu`, `cuda[:sm_NN]` or `aarch64` and run them on its virtual machine.

    Settings in `options.extra`: `tune_trials` (MetaSchedule's trial budget; without it, TVM's default
    schedules, dlight's on CUDA), `tune_records` (the records folder; given without `tune_trials`, its records
    are applied and nothing is tuned), `rpc` (`host:port:key` of an RPC tracker: run and time the model on a
    server of that key instead of here), `cuda_graph` (`true` or `false`, CUDA targets only, default on: capture
    the launches between the first, which reads the inputs, and the last, which writes the outputs, in a CUDA
    graph on the first run and replay it).
    """

    name = "tvm"
    targets = TARGET_NAMES
    capabilities = BackendCapabilities(contrib_ops=CONTRIB_CONVERTERS, static_shapes=True)

    def check_target(self, target: str) -> None:
        resolve_target(target)

    def compile(self, model: ModelInput, options: BackendOptions | None = None,
                progress: Callable[[str], None] | None = None) -> TvmCompiled:
        """Import and compile `model` for `options.target` (tuned when `options.extra` says so); BackendError
        naming what TVM cannot take (ops, dynamic shapes)."""
        options = options or BackendOptions()
        target = resolve_target(options.target, options.threads)
        tuning = tuning_options(options.extra)
        cuda_graph = cuda_graph_option(options.extra, target)
        proto = _load(model)
        module = relax_module(proto)
        if tuning is not None:
            from onnxforge.backends.tvm.tuning import compile_tuned  # MetaSchedule: loaded only when tuning

            executable = compile_tuned(module, target.target, tuning, progress, cuda_graph)
        else:
            try:
                # Read by RewriteCUDAGraph, one of the CUDA pipeline's finalization passes.
                with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": cuda_graph}):
                    executable = tvm.compile(module, target=target.target)
            except Exception as exc:
                raise BackendError(f"TVM cannot compile the model: {one_line(exc)}") from exc
        return TvmCompiled(executable, target, Signature.of(proto), cuda_graph)

    def prepare(self, model: ModelInput, options: BackendOptions | None = None) -> TvmPrepared:
        """Compile `model` and load it; BackendError when the target cannot run here (and no RPC is given)."""
        options = options or BackendOptions()
        return self.load(self.compile(model, options), options)

    def load(self, compiled: TvmCompiled, options: BackendOptions | None = None) -> TvmPrepared:
        """Load a compiled model here, or on a server of the RPC tracker that `options.extra["rpc"]` names."""
        address = (options or BackendOptions()).extra.get("rpc")
        if address:
            from onnxforge.backends.tvm.rpc import TrackerAddress, prepare_remote

            return prepare_remote(compiled, TrackerAddress.parse(address))
        return compiled.load()


def relax_module(proto: onnx.ModelProto) -> tvm.IRModule:
    """The model as a Relax module, weights bound, ready to compile; BackendError naming what TVM cannot take."""
    _check_importable(proto)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the importer prints what the error below says
            module = from_onnx(proto, keep_params_in_input=False)
        return relax.transform.DecomposeOpsForInference()(module)
    except Exception as exc:  # TVM raises its own error types (TVMError, InternalError, ...)
        raise BackendError(f"TVM cannot import the model: {one_line(exc)}") from exc


SETTINGS = ("tune_trials", "tune_records", "rpc", "cuda_graph")
SWITCHES = {"true": True, "false": False}


def tuning_options(extra: Mapping[str, str]) -> TuningOptions | None:
    """The tuning asked for in BackendOptions.extra (`tune_trials`, `tune_records`; records alone: 0 trials, apply
    them), or None."""
    unknown = sorted(set(extra) - set(SETTINGS))
    if unknown:
        raise BackendError(f"backend 'tvm' has no setting {', '.join(unknown)}; it knows {', '.join(SETTINGS)}")
    records = extra.get("tune_records")
    if "tune_trials" not in extra and not records:
        return None
    try:
        trials = int(extra.get("tune_trials", 0))
    except ValueError:
        raise BackendError(f"tune trials must be a whole number, got {extra['tune_trials']!r}") from None
    from onnxforge.backends.tvm.tuning import TuningOptions

    return TuningOptions(trials=trials, records=Path(records) if records else None)


def cuda_graph_option(extra: Mapping[str, str], target: TvmTarget) -> bool:
    """Whether the model's launches are captured in CUDA graphs: `cuda_graph` of BackendOptions.extra, by default
    on for CUDA targets (docs/tvm.md measures it); BackendError where it cannot apply."""
    value = extra.get("cuda_graph")
    if value is None:
        return target.device == "cuda"
    if value.lower() not in SWITCHES:
        raise BackendError(f"cuda_graph takes true or false, got {value!r}")
    enabled = SWITCHES[value.lower()]
    if enabled and target.device != "cuda":
        raise BackendError(f"cuda_graph is a setting of CUDA targets; target {target.name} runs on the CPU")
    return enabled


class TvmCompiled(Compiled):
    """A model compiled for a target: export it as an artifact, or load it where the target runs.

    `cuda_graph` says whether its static launches run as a captured CUDA graph.
    """

    def __init__(self, executable, target: TvmTarget, signature: Signature, cuda_graph: bool = False) -> None:
        self.executable, self.target, self.signature, self.cuda_graph = executable, target, signature, cuda_graph

    def export(self, path: str | os.PathLike) -> list[Path]:
        """Write the artifact (library and JSON) to `path`; returns the files written."""
        return export_artifact(self.executable, self.target, self.signature, path, cuda_graph=self.cuda_graph)

    def load(self) -> TvmPrepared:
        """Load the compiled model on this machine's device for the target."""
        if not self.target.runs_here():
            raise BackendError(self.target.why_not_here())
        device = tvm.cuda(0) if self.target.device == "cuda" else tvm.cpu(0)
        return TvmPrepared(relax.VirtualMachine(self.executable, device), device, self.signature)


class TvmPrepared(Prepared):
    """A compiled model on TVM's virtual machine, on a local or remote device."""

    def __init__(self, vm, device, signature: Signature) -> None:
        self.vm, self.device = vm, device
        self.input_names = [name for name, _, _ in signature.inputs]
        self.output_names = list(signature.outputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once and return its outputs by name; BackendError when an input is missing or wrong."""
        arguments = self.arguments(inputs)
        try:
            result = self.vm["main"](*arguments)
        except Exception as exc:
            raise BackendError(f"TVM cannot run the model: {one_line(exc)}") from exc
        return dict(zip(self.output_names, _outputs(result)))

    def measure(self, inputs: Mapping[str, np.ndarray], options: MeasureOptions = MeasureOptions()) -> LatencyStats:
        """Time single runs with TVM's time evaluator (on the device, or the remote one, itself), after warm-up;
        as many as `options` asks: at least `min_repeats` and `min_time_s`, at most the maximums."""
        self.run(inputs)  # turns a bad feed into a BackendError before timing starts
        arguments, main = self.arguments(inputs), self.vm["main"]
        for _ in range(options.warmup):
            main(*arguments)
        evaluate = self.vm.time_evaluator("main", self.device, number=1, repeat=1)
        once = max(float(evaluate(*arguments).results[0]), 1e-7)
        repeats = max(options.min_repeats, math.ceil(options.min_time_s / once))
        repeats = max(1, min(repeats, options.max_repeats, math.floor(options.max_time_s / once)))
        evaluate = self.vm.time_evaluator("main", self.device, number=1, repeat=repeats)
        return latency_stats_from_times(list(evaluate(*arguments).results), warmup=options.warmup)

    def arguments(self, inputs: Mapping[str, np.ndarray]) -> list:
        """The inputs in the model's order, on the device; BackendError naming a missing one."""
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise BackendError(f"TVM model run without input(s) {', '.join(missing)}")
        try:
            # ascontiguousarray would make a 0-d input 1-d
            return [tvm.runtime.tensor(np.require(inputs[n], requirements="C"), self.device) for n in self.input_names]
        except Exception as exc:
            raise BackendError(f"TVM cannot take the inputs: {one_line(exc)}") from exc


def _load(model: ModelInput) -> onnx.ModelProto:
    with model_source(model) as source:
        try:
            proto = source.load_proto()
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # onnx's external data checks
            raise BackendError(f"TVM cannot load the model's weights: {one_line(exc)}") from exc
    require_static_inputs(proto, "TVM")
    return proto


def _check_importable(proto: onnx.ModelProto) -> None:
    """One error naming every op of the main graph that TVM's ONNX importer does not convert, and every input
    that is not a tensor (sequences, optionals)."""
    known = _get_convert_map()

    def converted(node: onnx.NodeProto) -> bool:
        if node.domain in ("", "ai.onnx"):
            return node.op_type in known and node.op_type not in CONTRIB_CONVERTERS
        return node.domain == "com.microsoft" and node.op_type in CONTRIB_CONVERTERS

    missing = sorted(
        {f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in proto.graph.node if not converted(n)}
    )
    if missing:
        raise BackendError(f"TVM's ONNX importer does not support: {', '.join(missing)}")
    for value in proto.graph.input:
        if not value.type.HasField("tensor_type"):
            kind = value.type.WhichOneof("value")
            raise BackendError(f"TVM takes tensor inputs only: input '{value.name}' is a {kind}")


def _outputs(result) -> list:
    """The VM's result as a list of one value per model output (a Shape result is one int64 array)."""
    if isinstance(result, tvm_ffi.Shape):
        return [np.asarray(tuple(result), dtype=np.int64)]
    values = list(result) if isinstance(result, (list, tuple, tvm.ir.Array)) else [result]
    return [_outputs(v)[0] if isinstance(v, tvm_ffi.Shape) else v.numpy() for v in values]
