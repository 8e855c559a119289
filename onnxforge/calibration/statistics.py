"""Statistics of what layers read on calibration samples, computed once per model and sample set.

- Input second moments: XᵀX over the rows a layer reads (a MatMul's or Gemm's input rows, a Conv's input
  patches, as recovery fits them): GPTQ's Hessians (quant), whitening (lowrank), Optimal Brain Surgeon (prune).
- Channel moments: each channel's mean |x| and mean x² (pruning importance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from onnxforge.calibration.observe import counted_rows, observed, sampled_rows
from onnxforge.calibration.recovery import design_rows
from onnxforge.data import Sample
from onnxforge.ir import Model
from onnxforge.ir.layers import Layer

if TYPE_CHECKING:
    from onnxforge.calibration.context import Calibration


@dataclass
class SecondMoment:
    """XᵀX summed over the rows one layer read, and how many rows."""

    gram: np.ndarray
    rows: int

    @property
    def mean(self) -> np.ndarray:
        """XᵀX / rows: the second moment of one row."""
        return self.gram / max(self.rows, 1)


@dataclass
class ChannelMoments:
    """Each channel's mean |x| and mean x² of one tensor."""

    abs_mean: np.ndarray
    square_mean: np.ndarray


def input_moments(
    model: Model,
    layers: Sequence[Layer],
    samples: Sequence[Sample],
    calibration: Calibration,
    rows_per_sample: int | None = None,
    seed: int = 0,
    bias: bool = False,
) -> list[SecondMoment]:
    """XᵀX of the rows each layer (MatMul, Gemm, Conv, ConvTranspose) reads over `samples`, in `layers`' order.

    The rows are recovery's design rows (`design_rows`: what the layer reads at each output position), with the
    trailing 1 of a layer that has a bias when `bias`. rows_per_sample: at most this many of the positions that
    count on a sample (`counted_rows`: the real tokens), drawn by one generator seeded `seed`, layer after layer
    in the order given; None: every position, padding included. Cached on `calibration` for the model, the layers'
    nodes and the samples.
    """
    if not layers:
        return []
    key = ("input moments", rows_per_sample, seed, bias)
    nodes = [layer.node for layer in layers]
    return calibration.cached(
        model,
        key,
        nodes,
        samples,
        lambda: _input_moments(model, layers, samples, calibration, rows_per_sample, seed, bias),
    )


def channel_moments(
    model: Model, axes: Mapping[str, int], samples: Sequence[Sample], calibration: Calibration
) -> dict[str, ChannelMoments]:
    """The channel moments of each tensor named in `axes` (name -> its channel axis: 1 for what a Conv reads, -1
    for what a MatMul reads), over the positions that count on each sample (`counted_rows`: the real tokens).
    Cached on `calibration` for the model, the tensors and the samples."""
    key = ("channel moments", tuple(axes.items()))
    return calibration.cached(model, key, (), samples, lambda: _channel_moments(model, axes, samples, calibration))


def _input_moments(
    model: Model,
    layers: Sequence[Layer],
    samples: Sequence[Sample],
    calibration: Calibration,
    rows_per_sample: int | None,
    seed: int,
    bias: bool,
) -> list[SecondMoment]:
    names = list(dict.fromkeys(t.name for layer in layers for t in (layer.activation, layer.node.outputs[0])))
    with_bias = [bias and layer.bias is not None for layer in layers]
    rng = np.random.default_rng(seed)
    grams: list = [0] * len(layers)
    counts = [0] * len(layers)
    for sample, values in observed(model, names, samples, calibration):
        for index, layer in enumerate(layers):
            x, y = values[layer.activation.name], values[layer.node.outputs[0].name]
            positions = layer.output_positions(y.shape)
            if rows_per_sample is None:
                chosen = np.arange(positions)
            else:
                chosen = sampled_rows(sample, positions, rows_per_sample, rng)
            rows = design_rows(layer.node, x, chosen, y.shape, with_bias[index])
            grams[index] = grams[index] + rows.T @ rows
            counts[index] += len(rows)
    return [SecondMoment(np.asarray(gram, np.float64), count) for gram, count in zip(grams, counts)]


def _channel_moments(
    model: Model, axes: Mapping[str, int], samples: Sequence[Sample], calibration: Calibration
) -> dict[str, ChannelMoments]:
    sums: dict[str, list] = {}
    for sample, values in observed(model, list(axes), samples, calibration):
        for name, axis in axes.items():
            value = values[name]
            x = np.moveaxis(np.asarray(value, np.float64), axis, 0).reshape(value.shape[axis], -1)
            x = x[:, counted_rows(sample, x.shape[1])]
            total = sums.setdefault(name, [0.0, 0.0, 0])
            total[0] = total[0] + np.abs(x).sum(1)
            total[1] = total[1] + np.square(x).sum(1)
            total[2] += x.shape[1]
    return {name: ChannelMoments(a / n, q / n) for name, (a, q, n) in sums.items()}
