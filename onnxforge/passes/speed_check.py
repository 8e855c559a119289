"""The check that lossy passes which promise speed end with: time the result, and step back if it is slower."""

from __future__ import annotations

from onnxforge.data import random_inputs
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.passes.base import PassContext


def kept_if_faster(
    original: Model, model: Model, ctx: PassContext, min_speedup: float, stats: dict, notes: list[str]
) -> bool:
    """Time `model` against `original` on the context's backend (interleaved, on the first --data sample or a
    random input); below `min_speedup` put the original graph back (and `params_removed` to 0). Records the
    speedup in `stats` and `notes`."""
    feed = (ctx.data or [random_inputs(skeleton_proto(model), seed=0)])[0]
    speedup = ctx.time_models([ctx.prepare(original), ctx.prepare(model)], feed)[1].speedup
    stats["measured_speedup"] = round(speedup, 4)
    notes.append(f"whole model measured {speedup:.2f}x against the model before the pass on {ctx.backend}/{ctx.target}")
    if speedup >= min_speedup:
        return True
    notes.append(f"below min_speedup={min_speedup:g}: the model is left as it was")
    stats["params_removed"] = 0
    model.graph = original.graph
    return False
