"""A lossy pass's acceptance (speed, size): declared by the pass, judged by the pass manager against the model
before the pass, recorded as a decision and replayed from it without timing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.ir import Model, load_model
from onnxforge.measure import InterleavedTiming
from onnxforge.pipeline import Pass, PassContext, PassManager, PassResult
from onnxforge.pipeline.acceptance import Acceptance, speedups_over
from onnxforge.pipeline.decisions import Decisions

WIDTH = 256
# Short timings: the pass below makes the model tens of times slower, far beyond any noise.
QUICK = InterleavedTiming(blocks=3, block_s=0.001, min_runs=2, warmup=1)


def _model() -> Model:
    """x [64, 256] -> MatMul by a [256, 8] weight -> y: a few microseconds."""
    weight = numpy_helper.from_array(np.full((WIDTH, 8), 0.01, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 8])],
        [weight],
    )
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


class AddsWork(Pass):
    """Adds two 256x256 MatMuls on the input whose sum joins the output times zero: the same outputs, a model
    tens of times slower and bigger. Its acceptance comes from its options, as lossy passes' do."""

    name = "test-adds-work"
    lossless = False

    @dataclass
    class Options:
        measure: bool = True
        min_speedup: float = 1.0
        max_size_ratio: float | None = None

    def run(self, model, ctx):
        graph = model.graph
        (output,) = graph.outputs
        before = gs.Variable("before_work", np.float32)
        output.inputs[0].outputs = [before]
        hidden = graph.inputs[0]
        for index in range(2):
            weight = np.full((WIDTH, WIDTH), 1e-3, np.float32)
            hidden = graph.layer(op="MatMul", inputs=[hidden, weight], outputs=[f"work_{index}"])[0]
        total = graph.layer(op="ReduceSum", inputs=[hidden], outputs=["work_sum"])[0]
        zeroed = graph.layer(op="Mul", inputs=[total, np.zeros((1, 1), np.float32)], outputs=["work_zeroed"])[0]
        graph.layer(op="Add", inputs=[before, zeroed], outputs=[output])
        return PassResult(True, stats={"matmuls_added": 2}, notes=["added two MatMuls"])

    def acceptance(self):
        speed = self.options.min_speedup if self.options.measure else None
        return Acceptance(min_speedup=speed, max_size_ratio=self.options.max_size_ratio, zeroed=("matmuls_added",))


def _run(pass_: Pass, decisions: Decisions | None = None):
    context = PassContext(timing=QUICK, decisions=decisions)
    model, (record,) = PassManager([pass_], context=context).run(_model())
    return model, record, context.decisions


def test_a_result_slower_than_min_speedup_is_stepped_back_after_a_second_timing():
    model, record, decisions = _run(AddsWork(min_speedup=1.0))
    assert record.status == "unchanged" and model.stats() == _model().stats() == record.after
    assert record.stats["measured_speedup"] < 1 and record.stats["matmuls_added"] == 0
    assert record.notes[0] == "added two MatMuls"
    assert record.notes[1].startswith("whole model measured ") and "against the model before the pass" in record.notes[1]
    assert record.notes[2].startswith("timed again: ")
    assert record.notes[3] == "below min_speedup=1: the model is left as it was"
    assert decisions.to_dict()["values"] == {"1:test-adds-work/whole model kept": False}


def test_a_result_that_reaches_min_speedup_is_kept_after_one_timing():
    model, record, _ = _run(AddsWork(min_speedup=0.0))
    assert record.status == "applied" and model.stats().nodes == 6
    assert record.stats["matmuls_added"] == 2 and record.stats["measured_speedup"] > 0
    assert not any(note.startswith("timed again") for note in record.notes)


def test_a_replay_takes_the_recorded_verdict_and_times_nothing():
    # Each record says the opposite of what timing would: timed, the first is always kept, the second never.
    for min_speedup, kept in ((0.0, False), (100.0, True)):
        pass_ = AddsWork(min_speedup=min_speedup)
        recorded = Decisions({f"1:{pass_.describe()}/whole model kept": kept}, source="decisions=")
        _, record, _ = _run(pass_, recorded)
        assert record.status == ("applied" if kept else "unchanged")
        assert "measured_speedup" not in record.stats and record.stats["decisions_replayed"] == 1
        said = "kept" if kept else "stepped back"
        assert f"whole model {said} as decisions= records, not timed" in record.notes


def test_a_size_bound_steps_back_a_result_that_grows_the_model_without_timing_it():
    _, record, decisions = _run(AddsWork(measure=False, max_size_ratio=1.0))
    assert record.status == "unchanged" and record.stats["size_ratio"] > 1 and record.stats["matmuls_added"] == 0
    assert record.notes[-1] == "above max_size_ratio=1: the model is left as it was"
    assert decisions.to_dict()["values"] == {}
    _, record, _ = _run(AddsWork(measure=False, max_size_ratio=1000.0))
    assert record.status == "applied"


def test_the_report_and_its_explanation_say_why_a_result_was_stepped_back():
    _, report = optimize(_model().to_proto(), [AddsWork(measure=False, max_size_ratio=1.0)], seed=0)
    explanation = report.explanation()
    assert "test-adds-work:measure=false:max_size_ratio=1.0 (unchanged):" in explanation
    assert "above max_size_ratio=1: the model is left as it was" in explanation
    assert "size_ratio=" in report.summary()


def test_a_pass_run_directly_is_not_judged():
    model, context = _model(), PassContext(timing=QUICK)
    assert AddsWork(min_speedup=100.0).run(model, context).changed
    assert model.stats().nodes == 6 and context.decisions.to_dict()["values"] == {}


def test_a_second_timing_is_taken_only_when_the_first_would_overturn_the_default():
    context = PassContext(timing=QUICK)
    plain, slower = _model(), _model()
    AddsWork().run(slower, context)
    feed = context.runtime.feed(plain)
    fast, slow = context.runtime.prepare(plain), context.runtime.prepare(slower)
    # Standing candidates (a pass's result) are turned down only when a second timing agrees: the better counts.
    turned_down = speedups_over(context.runtime, fast, [slow], feed, needed=1.0)
    assert len(turned_down.again) == 1 and turned_down.settled == [max(turned_down.first + turned_down.again)]
    assert speedups_over(context.runtime, fast, [slow], feed, needed=0.0).again == []
    # A candidate that must earn its place (a refinement) is taken only when a second timing agrees: the worse counts.
    taken = speedups_over(context.runtime, slow, [fast], feed, needed=1.0, standing=False)
    assert len(taken.again) == 1 and taken.settled == [min(taken.first + taken.again)]
    assert speedups_over(context.runtime, fast, [slow], feed, needed=1.0, standing=False).again == []
