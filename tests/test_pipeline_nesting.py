"""A list of passes used as one pass (`Pipeline`), and composite passes whose members are lossy: the pass manager
checks each member as it checks its own passes (verified, judged by its acceptance, rolled back on its own), and
keys a member's decisions by its place inside the composite."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.errors import PassError
from onnxforge.ir import Model
from onnxforge.pipeline import Pass, PassContext, PassManager, PassResult, Pipeline, VerifyOptions
from onnxforge.pipeline.decisions import Decisions
from test_acceptance import QUICK, AddsWork, _model


class Doubles(Pass):
    """Doubles the weight: a lossy change the verifier lets through (outputs are only compared for lossless
    passes)."""

    name = "test-doubles"
    lossless = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        (node,) = [n for n in model.graph.nodes if n.name == "fc"]
        weight = node.inputs[1]
        node.inputs[1] = gs.Constant(weight.name + "_doubled", np.asarray(weight.values) * 2)
        return PassResult(True, stats={"doubled": 1}, notes=["weight doubled"])


class Breaks(Pass):
    """Claims to be lossless but negates the weight: the verifier rolls it back."""

    name = "test-breaks"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        (node,) = [n for n in model.graph.nodes if n.op == "MatMul"]
        weight = node.inputs[1]
        node.inputs[1] = gs.Constant(weight.name + "_negated", -np.asarray(weight.values))
        return PassResult(True, notes=["weight negated"])


class Fails(Pass):
    name = "test-fails"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise PassError("always fails")


def _run(passes: list[Pass], decisions: Decisions | None = None, verify: bool = True):
    context = PassContext(timing=QUICK, decisions=decisions)
    manager = PassManager(passes, context=context, verify=VerifyOptions(enabled=verify))
    model, records = manager.run(_model())
    return model, records, context.decisions


def _weight(model: Model) -> np.ndarray:
    (node,) = [n for n in model.graph.nodes if n.name == "fc"]
    return np.asarray(node.inputs[1].values)


def test_a_member_that_misses_its_acceptance_is_stepped_back_and_the_others_stay():
    model, (record,), decisions = _run([Pipeline([Doubles(), AddsWork(min_speedup=1.0)])])
    assert record.status == "applied" and record.name == "pipeline(test-doubles,test-adds-work)"
    assert np.allclose(_weight(model), 0.02) and len(model.graph.nodes) == 1
    assert record.stats["doubled"] == 1 and record.stats["matmuls_added"] == 0
    assert "weight doubled" in record.notes and any("left as it was" in note for note in record.notes)
    assert {m["name"]: m["status"] for m in record.members} == {"test-doubles": "applied"}
    assert list(decisions.made) == ["1.1.2:test-adds-work/whole model kept"]


def test_the_acceptance_of_a_member_is_judged_without_verification_too():
    model, (record,), _ = _run([Pipeline([AddsWork(min_speedup=1.0)])], verify=False)
    assert record.status == "unchanged" and len(model.graph.nodes) == 1


def test_a_member_that_breaks_the_model_or_fails_is_rolled_back_alone():
    model, (record,), _ = _run([Pipeline([Breaks(), Fails(), Doubles()])])
    assert record.status == "applied" and np.allclose(_weight(model), 0.02)
    statuses = {m["name"]: m["status"] for m in record.members}
    assert statuses == {"test-breaks": "rolled_back", "test-fails": "rolled_back", "test-doubles": "applied"}
    assert any(note.startswith("test-fails rolled back: always fails") for note in record.notes)


def test_pipelines_nest_and_their_decisions_replay_by_place():
    nested = [Doubles(), Pipeline([Doubles(), Pipeline([AddsWork(min_speedup=0.0)])])]
    model, records, decisions = _run(nested)
    assert [r.status for r in records] == ["applied", "applied"] and np.allclose(_weight(model), 0.04)
    assert list(decisions.made) == ["2.1.2.1.1:test-adds-work:min_speedup=0.0/whole model kept"]
    recorded = Decisions.replay({"decisions": decisions.to_dict()})
    replayed, _, again = _run(nested, decisions=recorded)
    assert all(decision.replayed for decision in again.made.values())
    assert replayed.stats() == model.stats()


def test_a_lossless_composite_is_lossless_and_checked_as_a_whole_first():
    lossless, lossy = Pipeline([Pipeline([Breaks()])]), Pipeline([Breaks(), Doubles()])
    assert lossless.lossless and lossless.checked_whole()
    assert not lossy.lossless and not lossy.checked_whole()
    assert lossy.describe() == "pipeline(test-breaks,test-doubles)"
    assert Pipeline([Doubles()], max_rounds=2).describe() == "pipeline(test-doubles):max_rounds=2"
