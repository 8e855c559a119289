"""onnxruntime on the CPU execution provider as an onnxforge backend."""

from __future__ import annotations

import functools
import os
import platform
import queue
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxforge.backends.base import (
    Backend,
    BackendCapabilities,
    BackendOptions,
    ModelInput,
    Prepared,
    model_source,
)
from onnxforge.errors import BackendError
from onnxforge.ir.ops import CONTRIB_DOMAIN
from onnxforge.ir.runtime_source import RuntimeSource
from onnxforge.limits import check_deadlines, execution_timed_out, execution_timeout_s, running_execution
from onnxforge.measure import LatencyStats, MeasureOptions, measure_latency

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
# Where in onnxruntime's sources a check failed ("/onnxruntime_src/.../graph.cc:1617 void onnxruntime::...() "):
# of no use to the reader of an error line.
_ORT_SOURCE_LOCATION = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[^()]*\([^()]*\)(?: const)? )?")


class OrtBackend(Backend):
    """Prepare models as onnxruntime inference sessions on the CPU."""

    name = "ort"
    targets = ("cpu",)

    @functools.cached_property
    def capabilities(self) -> BackendCapabilities:
        """Every com.microsoft op the installed onnxruntime has a CPU kernel for; shapes may stay dynamic."""
        kernels = ort.capi._pybind_state.get_all_opkernel_def()  # the kernel registry, as onnxruntime's tools read it
        contrib = {k.op_name for k in kernels if k.domain == CONTRIB_DOMAIN and k.provider == "CPUExecutionProvider"}
        return BackendCapabilities(contrib_ops=frozenset(contrib), seven_bit_int8_weights=_int8_kernels_overflow())

    def prepare(self, model: ModelInput, options: BackendOptions | None = None) -> OrtPrepared:
        """Create an inference session for `model`; BackendError when onnxruntime rejects it."""
        options = options or BackendOptions()
        self.check_target(options.target)
        with model_source(model) as source:
            session_options, weights = _session_options(options, source)
            session = create_session(source.model_bytes, session_options)
        # onnxruntime uses the arrays of weights given in memory in place: they must live as long as the session.
        session.onnxforge_weights = weights
        return OrtPrepared(session)


def create_session(model_bytes: bytes, session_options: ort.SessionOptions) -> ort.InferenceSession:
    """An inference session of the serialized model on the CPU execution provider; BackendError when onnxruntime
    rejects it."""
    # onnxruntime's exceptions share no base class below Exception.
    try:
        return ort.InferenceSession(model_bytes, sess_options=session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(f"onnxruntime cannot load the model: {_one_line(exc)}") from exc


class OrtPrepared(Prepared):
    """An onnxruntime inference session."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session once and return its outputs by name; BackendError when onnxruntime fails.

        The run can be stopped: Ctrl-C (or any exception raised in this thread while it waits), an active
        deadline that runs out, or the bound of one execution (`limits.execution_timeout_s()`) ends it with
        the exception or a TimeLimitError.
        """
        feed = dict(inputs)
        run_options = ort.RunOptions()
        finished = threading.Event()
        result: list = []

        def execute() -> None:
            try:
                result.append(self.session.run(None, feed, run_options))
            except Exception as exc:
                result.append(exc)

        bound = execution_timeout_s()
        with running_execution(lambda: _terminate(run_options)):
            _run_on_worker(execute, finished)
            try:
                in_time = finished.wait(bound)
            finally:
                if not finished.is_set():  # interrupted, or past the bound
                    _terminate(run_options)
                    finished.wait()
            if not in_time:
                raise execution_timed_out(bound)
        outputs = result[0]
        if isinstance(outputs, Exception):
            check_deadlines()  # stopped because a deadline ran out: say so, not that the model is broken
            raise BackendError(f"onnxruntime cannot run the model: {_one_line(outputs)}") from outputs
        return dict(zip(self.output_names, outputs))

    def measure(self, inputs: Mapping[str, np.ndarray], options: MeasureOptions = MeasureOptions()) -> LatencyStats:
        """Time repeated runs on `inputs` and return their latency statistics; an active deadline that runs out
        stops the timing with a TimeLimitError."""
        self.run(inputs)  # turns a bad feed into a BackendError, and a model that never ends into an error
        feed = dict(inputs)
        run_options = ort.RunOptions()
        # Calling the session directly keeps the output-dict building and the thread of run() out of the timings.
        with running_execution(lambda: _terminate(run_options)):
            try:
                return measure_latency(lambda: self.session.run(None, feed, run_options), options)
            except Exception as exc:
                check_deadlines()
                raise BackendError(f"onnxruntime cannot run the model: {_one_line(exc)}") from exc


def _session_options(
    options: BackendOptions, source: RuntimeSource
) -> tuple[ort.SessionOptions, list[ort.OrtValue]]:
    """Session options for `options`, and for `source`: the folder its external data is resolved in (onnxruntime
    checks that every location stays inside it) and its weights given in memory (returned: keep them alive)."""
    session_options = ort.SessionOptions()
    if source.external_folder is not None:
        session_options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(source.external_folder)
        )
    weights = [ort.OrtValue.ortvalue_from_numpy(array) for array in source.initializers.values()]
    if weights:
        session_options.add_external_initializers(list(source.initializers), weights)
    session_options.graph_optimization_level = _OPTIMIZATION_LEVELS[options.graph_optimization]
    session_options.intra_op_num_threads = options.threads or 0  # 0: onnxruntime's default
    spinning = "1" if options.allow_spinning else "0"
    session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    if options.execution_mode == "parallel":
        session_options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        session_options.inter_op_num_threads = 0  # onnxruntime's default
        # The branches' pool spins as the nodes' pool does (allow_spinning says why it must not by default).
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    else:
        session_options.inter_op_num_threads = 1
    for key, value in options.extra.items():
        session_options.add_session_config_entry(key, str(value))
    return session_options, weights


class _Worker:
    """A daemon thread that runs model executions handed to it, one at a time.

    onnxruntime holds the thread that calls it until the run ends, signals or not: runs execute here while the
    calling thread waits where a signal can interrupt it. Workers are reused (starting a thread costs more than
    running a small model); one stuck in a run that cannot be stopped never becomes idle again.
    """

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="onnxforge-ort-run", daemon=True).start()

    def _serve(self) -> None:
        while True:
            job, finished = self.jobs.get()
            try:
                job()
                _idle_workers.append(self)  # before `finished`, so the caller's next run finds this worker idle
            finally:
                finished.set()


_idle_workers: list[_Worker] = []
os.register_at_fork(after_in_child=_idle_workers.clear)  # a forked child has none of the parent's threads


def _run_on_worker(job: Callable[[], None], finished: threading.Event) -> None:
    """Run `job` on an idle worker (a new one if none is idle) and set `finished` when it returns."""
    try:
        worker = _idle_workers.pop()
    except IndexError:
        worker = _Worker()
    worker.jobs.put((job, finished))


def _terminate(run_options: ort.RunOptions) -> None:
    run_options.terminate = True


def _one_line(exc: Exception) -> str:
    """Return onnxruntime's message without its error-code prefix, folded onto one line."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return _ORT_SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", message)) or type(exc).__name__


def _int8_kernels_overflow() -> bool:
    """Whether onnxruntime's uint8 x int8 kernels on this CPU add pairs of products in 16 bits: x86 with AVX2 and
    without VNNI (vpmaddubsw), where onnxruntime's documentation asks for 7-bit weights (`reduce_range`)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
