"""What every trained case is: an fp32 model, its calibration and held-out inputs, and how to judge a copy of it;
the onnxruntime session the benchmarks run it in, and its calibration samples as a file for `--data`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]


@dataclass
class TrainedCase:
    """A trained fp32 model, its calibration and held-out inputs, and how to judge a quantized copy of it.

    `evaluate` runs an onnxruntime session over the held-out inputs and returns what `agreement` compares;
    `agreement(reference, candidate)` gives metric name -> value, the headline metric (named by `headline`, the
    one the targets are judged on) first. Each metric is a function of (reference, candidate) in `metrics`.
    """

    name: str
    description: str
    model_path: Path
    calibration: list[Feed]
    held_out: list[Feed]
    timing_feed: Feed
    headline: str = ""
    metrics: dict[str, Callable[[list[np.ndarray], list[np.ndarray]], float]] = field(default_factory=dict)

    def evaluate(self, session) -> list[np.ndarray]:
        """Run `session` on every held-out feed; return its first output for each."""
        return [session.run(None, feed)[0] for feed in self.held_out]

    def agreement(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
        """Compare a candidate's `evaluate` result with fp32's: metric name -> value, the headline first."""
        return {name: float(metric(reference, candidate)) for name, metric in self.metrics.items()}


def ort_session(model_path: str | os.PathLike[str], threads: int = 0, settings: dict | None = None):
    """An onnxruntime CPU session as the benchmark times it: graph optimization ALL, intra-op spinning off; or with
    `settings`, the `onnxruntime.SessionOptions` attributes a search chose (optimize --auto's session.json)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A spinning pool steals the cores of the session timed after it (benchmarks/README.md, "How two models are timed").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    for name, value in (settings or {}).items():
        enum = {"graph_optimization_level": onnxruntime.GraphOptimizationLevel,
                "execution_mode": onnxruntime.ExecutionMode}.get(name)
        setattr(options, name, getattr(enum, value) if enum else value)
    if (settings or {}).get("execution_mode") == "ORT_PARALLEL":
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def save_calibration(case: TrainedCase, path: str | os.PathLike[str]) -> Path:
    """Write the case's calibration samples as onnxforge's `--data` reads them back (`data.save_samples`): one
    stacked `.npz` (each array N x input shape) at `path`, or where the samples' shapes differ (recordings of
    different lengths), a folder of one `.npz` each beside it; return what was written."""
    from onnxforge.data import save_samples

    path = Path(path)
    shapes = {tuple((name, np.shape(array)) for name, array in sorted(sample.items())) for sample in case.calibration}
    if len(shapes) > 1:
        path = path.with_suffix("")
        shutil.rmtree(path, ignore_errors=True)
        save_samples(path, case.calibration, layout="folder")
        return path
    save_samples(path, case.calibration)
    return path


def fixed_input_copy(source: Path, path: Path, shape: tuple[int, ...]) -> Path:
    """`path`: a copy of the model at `source` with its first input fixed at `shape` (so every tool sees one shape),
    written once (atomically) and reused."""
    import onnx

    if not path.exists():
        model = onnx.load(source)
        for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, shape):
            dim.Clear()
            dim.dim_value = value
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, tmp)
        tmp.replace(path)
    return path
