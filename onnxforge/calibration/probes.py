"""Run a model on samples with one layer's weight at a time replaced: what each change costs at its outputs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.data import Sample
from onnxforge.ir import Model
from onnxforge.ir.edit import unique_name
from onnxforge.ir.layers import Layer

if TYPE_CHECKING:
    from onnxforge.calibration.context import Calibration


def replacement_errors(
    model: Model,
    layers: Sequence[Layer],
    replacements: Sequence[Iterable[np.ndarray]],
    samples: Sequence[Sample],
    calibration: Calibration,
) -> list[list[float]]:
    """For each layer and each of its `replacements` (weights in the layout stored, taken one at a time), the
    model's relative squared error on `samples` when only that layer has that weight: |y' - y|² / |y|² over
    every float output, pooled over the samples and summed over the outputs.

    The model is prepared once, with the layers' weights as inputs, so that each replacement costs only runs;
    each layer probed is reported to `calibration.progress` (`sensitivity probe 3/40`).
    """
    probe = model.copy()
    twins = dict(zip(map(id, model.graph.nodes), probe.graph.nodes))
    originals = {}
    for layer in layers:
        weight = gs.Variable(unique_name(probe.graph, f"{layer.weight.name}_probed"), np.float32, layer.weight.shape)
        twins[id(layer.node)].inputs[layer.weight_input] = weight
        probe.graph.inputs.append(weight)
        originals[weight.name] = np.asarray(layer.weight.values, np.float32)
    probe.graph.cleanup()
    run = calibration.runner(probe)

    def outputs(changed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        return [run({**sample, **originals, **changed}) for sample in samples]

    reference = outputs({})
    errors = []
    for number, (name, weights) in enumerate(zip(originals, replacements), start=1):
        errors.append([_relative_squared_error(reference, outputs({name: np.asarray(w, np.float32)})) for w in weights])
        calibration.progress(f"sensitivity probe {number}/{len(originals)}")
    return errors


def _relative_squared_error(reference: list[dict[str, np.ndarray]], changed: list[dict[str, np.ndarray]]) -> float:
    total = 0.0
    for name, value in reference[0].items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            ref = np.concatenate([np.asarray(run[name], np.float64).ravel() for run in reference])
            new = np.concatenate([np.asarray(run[name], np.float64).ravel() for run in changed])
            total += float(np.sum((new - ref) ** 2)) / max(float(np.sum(ref**2)), 1e-30)
    return total
