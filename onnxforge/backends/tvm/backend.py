"""Apache TVM (Relax) as an onnxforge backend: import the ONNX model, compile it for the target, run it on TVM's VM.

Targets: `cpu`, LLVM for this machine's CPU with its real features (`mcpu` from LLVM's host detection).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx

from onnxforge.backends.base import Backend, BackendOptions, ModelInput, Prepared, model_source
from onnxforge.errors import BackendError
from onnxforge.measure import LatencyStats, MeasureOptions, measure_latency

try:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
except ImportError as exc:  # get_backend turns this into a one-line error naming the package
    raise ModuleNotFoundError(f"apache-tvm (pip install 'onnxforge[tvm]'): {exc}") from exc


class TvmBackend(Backend):
    """Compile models with TVM Relax (default schedules, no tuning yet) and run them on its virtual machine."""

    name = "tvm"
    targets = ("cpu",)
    static_shapes = True

    def prepare(self, model: ModelInput, options: BackendOptions | None = None) -> TvmPrepared:
        """Import and compile `model`; BackendError naming what TVM cannot take (ops, dynamic shapes)."""
        options = options or BackendOptions()
        self.check_target(options.target)
        proto = _load(model)
        _check_importable(proto)
        try:
            module = from_onnx(proto, keep_params_in_input=False)
            module = relax.transform.DecomposeOpsForInference()(module)
            executable = tvm.compile(module, target=cpu_target(options.threads))
        except Exception as exc:  # TVM raises its own error types (TVMError, InternalError, ...)
            raise BackendError(f"TVM cannot compile the model: {_one_line(exc)}") from exc
        return TvmPrepared(executable, proto)


def cpu_target(threads: int | None = None) -> tvm.target.Target:
    """LLVM for this machine's CPU (its real features), using `threads` cores or all of them."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": threads or os.cpu_count() or 1})


class TvmPrepared(Prepared):
    """A compiled model on TVM's virtual machine (CPU)."""

    def __init__(self, executable, proto: onnx.ModelProto) -> None:
        initializers = {t.name for t in proto.graph.initializer}
        self.input_names = [i.name for i in proto.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in proto.graph.output]
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.device)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once and return its outputs by name; BackendError when an input is missing or wrong."""
        arguments = self._arguments(inputs)
        try:
            result = self.vm["main"](*arguments)
        except Exception as exc:
            raise BackendError(f"TVM cannot run the model: {_one_line(exc)}") from exc
        outputs = list(result) if isinstance(result, (list, tuple, tvm.ir.Array)) else [result]
        return {name: value.numpy() for name, value in zip(self.output_names, outputs)}

    def measure(self, inputs: Mapping[str, np.ndarray], options: MeasureOptions = MeasureOptions()) -> LatencyStats:
        """Time repeated runs (the same warm-up, repeats and statistics as onnxruntime's); the inputs are copied
        to the device once, so only the compiled model is timed."""
        self.run(inputs)  # turns a bad feed into a BackendError before timing starts
        arguments, main = self._arguments(inputs), self.vm["main"]
        return measure_latency(lambda: main(*arguments), options)

    def _arguments(self, inputs: Mapping[str, np.ndarray]) -> list:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise BackendError(f"TVM model run without input(s) {', '.join(missing)}")
        try:
            return [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), self.device) for n in self.input_names]
        except Exception as exc:
            raise BackendError(f"TVM cannot take the inputs: {_one_line(exc)}") from exc


def _load(model: ModelInput) -> onnx.ModelProto:
    with model_source(model) as source:
        proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise BackendError(
                f"TVM needs static shapes: input '{value.name}' has a dynamic dimension; fix it (--shape) first"
            )
    return proto


def _check_importable(proto: onnx.ModelProto) -> None:
    """One error naming every op of the main graph that TVM's ONNX importer does not convert."""
    known = _get_convert_map()
    missing = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in proto.graph.node
                      if n.op_type not in known or n.domain not in ("", "ai.onnx")})
    if missing:
        raise BackendError(f"TVM's ONNX importer does not support: {', '.join(missing)}")


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
