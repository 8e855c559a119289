"""The pass manager: analysis caching and invalidation, records, instruments, the 1e-4 lossless bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.errors import OnnxforgeError
from onnxforge.ir import Model, load_model
from onnxforge.pipeline import Analysis, Instrument, Pass, PassContext, PassManager, PassResult
from onnxforge.backends.base import BackendOptions
from onnxforge.backends.onnxruntime import OrtBackend
from onnxforge.ir import infer_shapes
from onnxforge.passes.fusion import FuseActivations, FuseMatMulAdd
from onnxforge.pipeline import analyses
from onnxforge.pipeline.analyses import GraphView
from onnxforge.pipeline.verifier import Verifier, VerifyOptions


def _model():
    w = numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Sigmoid", ["a"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w],
    )
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


class CountingAnalysis(Analysis):
    computed = 0

    @classmethod
    def compute(cls, model: Model) -> int:
        cls.computed += 1
        return len(model.graph.nodes)


class ReadAnalysis(Pass):
    """Reads the counting analysis; changes nothing."""

    name = "test-read-analysis"

    def run(self, model, ctx):
        return PassResult(changed=False, stats={"nodes": ctx.analysis(CountingAnalysis, model)})


class ScaleWeight(Pass):
    """Multiplies the MatMul weight by `factor` (a new array: weights are never written in place)."""

    name = "test-scale-weight"

    lossless = True

    @dataclass
    class Options:
        factor: float = 1.0
        keep_analysis: bool = False

    def run(self, model, ctx):
        weight = model.graph.nodes[0].inputs[1]
        weight.values = (weight.values * np.float32(self.options.factor)).astype(np.float32)
        preserved = (CountingAnalysis,) if self.options.keep_analysis else ()
        return PassResult(changed=True, stats={"scaled": 1}, preserved=preserved)


def test_analysis_is_cached_until_a_pass_changes_the_model():
    CountingAnalysis.computed = 0
    passes = [ReadAnalysis(), ReadAnalysis(), ScaleWeight(factor=1.0), ReadAnalysis()]
    PassManager(passes, context=PassContext()).run(_model())
    assert CountingAnalysis.computed == 2


def test_a_pass_can_declare_an_analysis_preserved():
    CountingAnalysis.computed = 0
    passes = [ReadAnalysis(), ScaleWeight(factor=1.0, keep_analysis=True), ReadAnalysis()]
    PassManager(passes).run(_model())
    assert CountingAnalysis.computed == 1


def test_graph_view_analysis_is_available_to_passes():
    ctx = PassContext()
    model = _model()
    view = ctx.analysis(GraphView, model)
    assert view.has_edge(0, 1)
    assert ctx.analysis(GraphView, model) is view


def test_fusion_passes_share_one_shape_inference_until_a_step_changes_the_model(monkeypatch):
    """Inferred shapes are an analysis: the fusion passes that need them infer them once, again after a step that
    changed the model, and again after one rolled back (the model goes on as the snapshot, another graph)."""
    inferred = []
    monkeypatch.setattr(analyses, "infer_shapes", lambda model: inferred.append(model.graph) or infer_shapes(model))
    passes = [FuseActivations(), FuseMatMulAdd(), ScaleWeight(factor=1.0), FuseActivations(),
              ScaleWeight(factor=2.0), FuseActivations()]
    model, records = PassManager(passes).run(_model())
    assert [r.status for r in records] == ["unchanged"] * 2 + ["applied", "unchanged", "rolled_back", "unchanged"]
    assert len(inferred) == 3 and inferred[2] is not inferred[1] and inferred[2] is model.graph
    assert model.graph.tensors()["a"].shape == [2, 4]


def test_lossless_bound_accepts_float_rounding_and_rejects_real_change():
    within = ScaleWeight(factor=1.0 + 2e-5)
    beyond = ScaleWeight(factor=1.0 + 1e-3)
    model, records = PassManager([within, beyond]).run(_model())
    assert [r.status for r in records] == ["applied", "rolled_back"]
    assert records[0].max_rel_error < 1e-4
    assert "relative error" in records[1].error
    np.testing.assert_allclose(model.graph.nodes[0].inputs[1].values, 0.5 * (1.0 + 2e-5), rtol=1e-7)


def test_records_hold_time_sizes_and_counters():
    _, (record,) = PassManager([ScaleWeight(factor=1.0)]).run(_model())
    assert record.status == "applied"
    assert record.seconds > 0
    assert record.before.params == record.after.params == 16
    assert record.stats == {"scaled": 1}
    assert record.to_dict()["name"] == "test-scale-weight"


def test_the_input_model_is_not_modified():
    model = _model()
    PassManager([ScaleWeight(factor=3.0)], verify=None).run(model)
    assert isinstance(model.graph.nodes[0].inputs[1], gs.Constant)
    np.testing.assert_array_equal(model.graph.nodes[0].inputs[1].values, 0.5)


def test_instruments_see_every_pass_in_order():
    events = []

    class Recorder(Instrument):
        def before_pass(self, index, total, pass_, model):
            events.append(("before", index, total, pass_.name))

        def after_pass(self, index, total, record):
            events.append(("after", index, record.status))

    PassManager([ReadAnalysis(), ScaleWeight(factor=2.0)], instruments=[Recorder()]).run(_model())
    assert events == [
        ("before", 1, 2, "test-read-analysis"),
        ("after", 1, "unchanged"),
        ("before", 2, 2, "test-scale-weight"),
        ("after", 2, "rolled_back"),
    ]


class SilentChange(Pass):
    """Changes the graph but claims it did not."""

    name = "test-silent-change"

    def run(self, model, ctx):
        model.graph.nodes[1].op = "Tanh"
        model.graph.nodes.pop(0)
        return PassResult(changed=False)


def test_a_change_the_pass_did_not_report_is_still_verified():
    model, (record,) = PassManager([SilentChange()]).run(_model())
    assert record.status == "rolled_back"
    assert [n.op for n in model.graph.nodes] == ["MatMul", "Sigmoid"]


def test_with_data_the_checks_run_on_real_samples_where_random_inputs_would_fail():
    # Two table rows: random indices in [0, 8) would be out of range, the real samples are not.
    table = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "table")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["table"], ["t"]), helper.make_node("Gather", ["t", "ids"], ["y"])],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    samples = [{"ids": np.array([[0, 1]], np.int64)}, {"ids": np.array([[1, 1]], np.int64)}]
    _, report = optimize(model, "cleanup", data=samples)
    assert report.passes[0].status == "applied"
    assert report.verification["metric"].endswith("--data samples")
    with pytest.raises(OnnxforgeError, match="fails on random inputs"):
        optimize(model, "cleanup")


class _OptionsSeen(OrtBackend):
    """onnxruntime, keeping the options every model was prepared with."""

    def __init__(self):
        super().__init__()
        self.seen: list[BackendOptions] = []

    def prepare(self, model, options=None):
        self.seen.append(options)
        return super().prepare(model, options)


def test_the_verifier_runs_models_with_the_runs_threads():
    backend = _OptionsSeen()
    verifier = Verifier(VerifyOptions(threads=1), backend=backend)
    model = _model()
    reference = verifier.reference(model)
    assert verifier.check(model, reference, lossless=True).ok
    assert len(backend.seen) == 2 and all(options.threads == 1 for options in backend.seen)
