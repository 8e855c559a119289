"""Run a model on samples and show what its intermediate tensors hold (for calibration and data-aware methods)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.passes.base import PassContext

Sample = dict[str, np.ndarray]


def observe_tensors(
    model: Model,
    names: Sequence[str],
    samples: Sequence[Sample],
    ctx: PassContext,
    visit: Callable[[str, np.ndarray], None],
) -> None:
    """Run `model` on each sample and call `visit(name, value)` for every named tensor of its main graph.

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
    prepared = ctx.prepare(probe, graph_optimization="disable")
    for sample in samples:
        values = prepared.run(sample)
        for name in names:
            visit(name, values[name])


def run_model(model: Model, samples: Sequence[Sample], ctx: PassContext) -> list[dict[str, np.ndarray]]:
    """The outputs of `model` on each sample, on the context's backend with its optimizations on."""
    prepared = ctx.prepare(model)
    return [prepared.run(sample) for sample in samples]
