"""onnxruntime on the CPU execution provider as an onnxforge backend."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from onnxforge.backends.base import Backend, BackendOptions, ModelInput, Prepared, model_source
from onnxforge.errors import BackendError
from onnxforge.measure import LatencyStats, MeasureOptions, measure_latency

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


class OrtBackend(Backend):
    """Prepare models as onnxruntime inference sessions on the CPU."""

    name = "ort"
    targets = ("cpu",)

    def prepare(self, model: ModelInput, options: BackendOptions | None = None) -> OrtPrepared:
        """Create an inference session for `model`; BackendError when onnxruntime rejects it."""
        options = options or BackendOptions()
        self.check_target(options.target)
        session_options = _session_options(options)
        with model_source(model) as source:
            # onnxruntime's exceptions share no base class below Exception.
            try:
                session = ort.InferenceSession(
                    source, sess_options=session_options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:
                raise BackendError(f"onnxruntime cannot load the model: {_one_line(exc)}") from exc
        return OrtPrepared(session)


class OrtPrepared(Prepared):
    """An onnxruntime inference session."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session once and return its outputs by name; BackendError when onnxruntime fails."""
        try:
            outputs = self.session.run(None, dict(inputs))
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot run the model: {_one_line(exc)}") from exc
        return dict(zip(self.output_names, outputs))

    def measure(self, inputs: Mapping[str, np.ndarray], options: MeasureOptions = MeasureOptions()) -> LatencyStats:
        """Time repeated runs on `inputs` and return their latency statistics."""
        self.run(inputs)  # turns a bad feed into a BackendError before timing starts
        feed = dict(inputs)
        # Calling the session directly keeps the output-dict building of run() out of the timings.
        return measure_latency(lambda: self.session.run(None, feed), options)


def _session_options(options: BackendOptions) -> ort.SessionOptions:
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = _OPTIMIZATION_LEVELS[options.graph_optimization]
    session_options.intra_op_num_threads = options.threads or 0  # 0: onnxruntime's default
    session_options.inter_op_num_threads = 1
    session_options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
    )
    for key, value in options.extra.items():
        session_options.add_session_config_entry(key, str(value))
    return session_options


def _one_line(exc: Exception) -> str:
    """Return onnxruntime's message without its error-code prefix, folded onto one line."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return _ORT_PREFIX.sub("", message) or type(exc).__name__
