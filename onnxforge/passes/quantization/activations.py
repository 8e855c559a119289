"""Static activation quantization: each tensor's uint8 scale and zero point from its range on calibration samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.observe import observe_tensors
from onnxforge.data import Sample
from onnxforge.ir import Model
from onnxforge.passes.quantization.ranges import RangeObserver, scale_and_zero_point
from onnxforge.passes.quantization.rewrite import ActivationQuantization


def static_activations(
    model: Model,
    names: Sequence[str],
    samples: Sequence[Sample],
    calibration: Calibration,
    method: str,
    percentile: float,
    shared: Mapping[str, str] | None = None,
) -> dict[str, ActivationQuantization]:
    """uint8 asymmetric quantization of each named tensor of `model`'s main graph over its range on `samples` by
    `method` (minmax, percentile or entropy); a tensor in `shared` takes the quantization of the one it names
    (which must be among `names`) and is not observed."""
    shared = shared or {}
    observed = [name for name in names if name not in shared]
    observers = {name: RangeObserver() for name in observed}
    observe_tensors(model, observed, samples, calibration, lambda name, value: observers[name].observe(value))
    result = {}
    for name, observer in observers.items():
        low, high = observer.range(method, percentile=percentile)
        scale, zero_point = scale_and_zero_point(low, high, bits=8, signed=False, symmetric=False)
        result[name] = ActivationQuantization(np.float32(scale), np.array(zero_point, np.uint8))
    for name, source in shared.items():
        result[name] = result[source]
    return result
