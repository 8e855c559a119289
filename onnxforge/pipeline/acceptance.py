"""The check that lossy passes which promise speed end with: time the result, and step back if it is slower."""

from __future__ import annotations

from onnxforge.ir import Model
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.decisions import Measured


def kept_if_faster(
    original: Model, model: Model, ctx: PassContext, min_speedup: float, stats: dict, notes: list[str]
) -> bool:
    """Time `model` against `original` on the context's backend (interleaved, on `ctx.feed`: the first --data
    sample or a random input of the run's shapes); below `min_speedup` time them again, and if the second timing
    agrees put the original graph back (and `params_removed` to 0): a moment's load on the machine does not undo
    the pass. Records the speedup in `stats` and `notes`; a replayed run takes the recorded verdict instead of
    timing."""
    where = f"against the model before the pass on {ctx.backend}/{ctx.target}"

    def measure() -> Measured:
        feed = ctx.feed(original)
        prepared = [ctx.prepare(original), ctx.prepare(model)]
        speedups = [ctx.time_models(prepared, feed)[1].speedup]
        if speedups[0] < min_speedup:
            speedups.append(ctx.time_models(prepared, feed)[1].speedup)
        return Measured(max(speedups) >= min_speedup, {"speedups": [round(s, 4) for s in speedups]})

    decision = ctx.decide("kept after timing", measure)
    if decision.replayed:
        verdict = "kept" if decision.value else "stepped back"
        notes.append(f"{verdict} as {decision.replayed_from} records, not timed")
        stats["decisions_replayed"] = ctx.replayed_decisions()
    else:
        first, *again = decision.timings["speedups"]
        notes.append(f"whole model measured {first:.2f}x {where}")
        notes.extend(f"timed again: {speedup:.2f}x" for speedup in again)
        stats["measured_speedup"] = max(decision.timings["speedups"])
    if decision.value:
        return True
    notes.append(f"below min_speedup={min_speedup:g}: the model is left as it was")
    stats["params_removed"] = 0
    model.graph = original.graph
    return False
