"""Run a model on samples and show what its intermediate tensors hold (for calibration and data-aware methods)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.data import Sample
from onnxforge.ir import Model

if TYPE_CHECKING:
    from onnxforge.calibration.context import Calibration

# The input that marks a sample's real tokens (1) and its padding (0), by the Hugging Face convention. Rows of a
# [batch, tokens, ...] tensor at padding positions do not reach a pooled or masked output, so data-aware methods
# fit and measure only the real ones.
TOKEN_MASK = "attention_mask"


def observe_tensors(
    model: Model,
    names: Sequence[str],
    samples: Sequence[Sample],
    calibration: Calibration,
    visit: Callable[[str, np.ndarray], None],
) -> None:
    """Run `model` on each sample and call `visit(name, value)` for every named tensor of its main graph."""
    for _, values in observed(model, names, samples, calibration):
        for name in names:
            visit(name, values[name])


def observed(
    model: Model, names: Sequence[str], samples: Sequence[Sample], calibration: Calibration
) -> Iterator[tuple[Sample, dict[str, np.ndarray]]]:
    """Each sample with the values the named tensors of `model`'s main graph take on it, reported to
    `calibration.progress` as each is done with (`calibration 12/64`).

    The model runs with the backend's graph optimizations off, so every tensor keeps the value the
    graph as written gives it.
    """
    probe = model.copy()
    tensors = probe.graph.tensors()
    outputs = {t.name for t in probe.graph.outputs}
    for name in names:
        if name not in outputs:
            tensor = tensors[name]
            if isinstance(tensor, gs.Variable):
                tensor.dtype = tensor.dtype or np.float32
                probe.graph.outputs.append(tensor)
    run = calibration.runner(probe, graph_optimization="disable")
    for number, sample in enumerate(samples, start=1):
        yield sample, run(sample)
        calibration.progress(f"calibration {number}/{len(samples)}")


def counted_rows(sample: Sample, rows: int) -> np.ndarray:
    """Which of a tensor's `rows` (flat over its leading axes) count on `sample`: the real tokens, when the sample
    has a TOKEN_MASK of that many entries that marks some; all of them otherwise."""
    mask = sample.get(TOKEN_MASK)
    if mask is not None and mask.size == rows and np.any(mask):
        return np.flatnonzero(np.asarray(mask).reshape(-1))
    return np.arange(rows)


def sampled_rows(sample: Sample, rows: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` of the rows that count on `sample` (`counted_rows`), drawn at random, in order."""
    counted = counted_rows(sample, rows)
    return np.sort(rng.choice(counted, min(limit, len(counted)), replace=False))


def run_model(model: Model, samples: Sequence[Sample], calibration: Calibration) -> list[dict[str, np.ndarray]]:
    """The outputs of `model` on each sample, on the run's backend with its optimizations on."""
    run = calibration.runner(model)
    return [run(sample) for sample in samples]
