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
    random input); below `min_speedup` time them again, and if the second timing agrees put the original graph
    back (and `params_removed` to 0): a moment's load on the machine does not undo the pass. Records the speedup
    in `stats` and `notes`."""
    feed = (ctx.data or [random_inputs(skeleton_proto(model), seed=0)])[0]
    prepared = [ctx.prepare(original), ctx.prepare(model)]
    speedup = ctx.time_models(prepared, feed)[1].speedup
    where = f"against the model before the pass on {ctx.backend}/{ctx.target}"
    notes.append(f"whole model measured {speedup:.2f}x {where}")
    if speedup < min_speedup:
        again = ctx.time_models(prepared, feed)[1].speedup
        notes.append(f"timed again: {again:.2f}x")
        speedup = max(speedup, again)
    stats["measured_speedup"] = round(speedup, 4)
    if speedup >= min_speedup:
        return True
    notes.append(f"below min_speedup={min_speedup:g}: the model is left as it was")
    stats["params_removed"] = 0
    model.graph = original.graph
    return False
