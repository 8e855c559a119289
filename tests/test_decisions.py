"""Measured decisions: a run records them in its report, and a run given that report replays them without
timing anything and writes the same model, byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from graph_checks import constant, make_model, op_counts, value_info
from onnx import helper

from onnxforge import optimize
from onnxforge.errors import DecisionsError
from onnxforge.ir import load_model, save_model
from onnxforge.measure import InterleavedTiming
from onnxforge.pipeline import PassContext, PassManager, create_passes
from onnxforge.pipeline.decisions import Decisions

OPTIMIZE = [sys.executable, "-c", "import sys; from onnxforge.cli import optimize_main; sys.exit(optimize_main())"]
# Short timings: these tests check what is recorded and replayed, not which format is faster.
QUICK = InterleavedTiming(blocks=3, block_s=0.01, min_runs=2, warmup=1)
DYNAMIC_INT8 = "int8 dynamic, per-channel symmetric weights, DynamicQuantizeMatMul"


def _mlp() -> onnx.ModelProto:
    """x [8, 64] -> MatMul -> Relu -> MatMul -> y [8, 32], weights large enough for quant and prune."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
    ]
    weights = [
        constant("W1", (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)),
        constant("W2", (rng.standard_normal((128, 32)) * 0.1).astype(np.float32)),
    ]
    return make_model(nodes, [value_info("x", [8, 64])], [value_info("y", [8, 32])], weights, opset=21)


def _measured_run(passes: str):
    """Run `passes` on the MLP with short timings; return the model and the decisions it recorded."""
    context = PassContext(timing=QUICK)
    model, records = PassManager(create_passes(passes), context=context).run(load_model(_mlp()))
    return model, records, context.decisions


def _quantized_record(pass_position: str = "1:quant") -> dict:
    """A report's decisions section that quantizes the MLP's MatMuls to dynamic int8 and keeps the result."""
    values = {f"{pass_position}/MatMul layers": DYNAMIC_INT8, f"{pass_position}/whole model kept": True}
    return {"decisions": {"values": values}}


def test_a_quant_run_records_each_measured_choice_as_a_value_with_its_timings_beside_it():
    _, _, decisions = _measured_run("quant:bits=4")
    section = decisions.to_dict()
    formats = section["values"]["1:quant:bits=4/MatMul layers"]
    assert formats == "float" or formats.startswith("int4 weight-only, block 32 symmetric weights, MatMulNBits")
    speedups = section["timings"]["1:quant:bits=4/MatMul layers"]["speedups"]
    assert len(speedups) == 2  # MatMulNBits at both of its accuracy levels
    assert all(isinstance(value, (str, bool)) for value in section["values"].values())
    assert section["replayed_from"] is None


def test_the_report_of_a_run_holds_its_decisions_and_the_seed_a_replay_reuses():
    _, report = optimize(_mlp(), "prune:ratio=0.5", budget=None)
    payload = json.loads(json.dumps(report.to_dict(), default=str))
    assert list(payload["decisions"]["values"]) == ["1:prune:ratio=0.5/whole model kept"]
    assert len(payload["decisions"]["timings"]["1:prune:ratio=0.5/whole model kept"]["speedups"]) in (1, 2)
    _, replay = optimize(_mlp(), "prune:ratio=0.5", decisions=payload, budget=None)
    assert replay.verification["seed"] == payload["verification"]["seed"]
    assert replay.to_dict()["decisions"]["values"] == payload["decisions"]["values"]
    assert replay.passes[0].stats["decisions_replayed"] == 1 and "measured_speedup" not in replay.passes[0].stats


def test_a_replay_times_nothing_and_says_so_in_the_notes():
    model, report = optimize(_mlp(), "quant", decisions=_quantized_record())
    [record] = report.passes
    assert record.status == "applied" and op_counts(model)["DynamicQuantizeMatMul"] == 2
    assert record.stats["decisions_replayed"] == 2 and "measured_speedup" not in record.stats
    assert f"MatMul layers (2): quantized as {DYNAMIC_INT8}, as decisions= records, not timed" in record.notes
    assert "whole model kept as decisions= records, not timed" in record.notes
    assert not any("measured" in note for note in record.notes)


def test_a_replayed_float_decision_leaves_the_layers_float():
    record = {"decisions": {"values": {"1:quant/MatMul layers": "float"}}}
    model, report = optimize(_mlp(), "quant", decisions=record)
    assert report.passes[0].status == "unchanged" and op_counts(model)["MatMul"] == 2


def test_a_measured_run_and_its_replay_write_byte_identical_files(tmp_path):
    measured, _, decisions = _measured_run("cleanup,fuse,quant:bits=4")
    save_model(measured, tmp_path / "measured.onnx")
    # No budget, as the measured run had none: under the default one, int4 (when timed faster) can be stepped back.
    replayed, report = optimize(
        _mlp(), "cleanup,fuse,quant:bits=4", decisions={"decisions": decisions.to_dict()}, budget=None
    )
    assert report.passes[2].stats.get("decisions_replayed", 0) >= 1
    save_model(replayed, tmp_path / "replayed.onnx")
    assert (tmp_path / "measured.onnx").read_bytes() == (tmp_path / "replayed.onnx").read_bytes()


def test_a_quantized_copy_that_is_run_and_dropped_leaves_the_originals_opsets_alone():
    # Timing a quantized candidate exports it; the model it was copied from must not gain its contrib domain,
    # or a run that measured and dropped the candidate writes another file than its replay, which times nothing.
    original = load_model(_mlp())
    candidate = original.copy()
    (quant,) = create_passes("quant:measure=false")
    assert quant.run(candidate, PassContext()).changed
    candidate.to_proto()
    assert [o.domain for o in original.to_proto().opset_import] == [""]


def test_a_replay_from_another_pipeline_is_one_error_naming_the_missing_decision():
    with pytest.raises(DecisionsError) as raised:
        optimize(_mlp(), "cleanup,quant", decisions=_quantized_record("1:quant"))
    message = str(raised.value)
    assert message.startswith("decisions= has no decision '2:quant/MatMul layers'")
    assert "written by another pipeline or onnxforge version" in message


def test_a_recorded_format_this_run_does_not_offer_is_refused():
    record = {"decisions": {"values": {"1:quant/MatMul layers": "int3 telepathic"}}}
    with pytest.raises(DecisionsError, match="decides 'int3 telepathic' for '1:quant/MatMul layers'"):
        optimize(_mlp(), "quant", decisions=record)


def test_a_pipeline_that_times_nothing_needs_no_decisions():
    model, report = optimize(_mlp(), "cleanup,quant:measure=false", decisions={"decisions": {"values": {}}})
    assert report.passes[1].status == "applied" and report.to_dict()["decisions"]["values"] == {}


@pytest.mark.parametrize(
    ("content", "said"),
    [("{}", "holds no decisions"), ("not json", "is not a JSON report"), (None, "no such file")],
)
def test_a_decisions_file_that_is_not_a_report_is_refused_before_any_work(tmp_path, content, said):
    path = tmp_path / "record.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DecisionsError, match=said):
        Decisions.replay(path)


def _optimize_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*OPTIMIZE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # the recording run times the model for seconds; CI runs the replay below
def test_cli_report_then_decisions_replays_into_a_byte_identical_model(tmp_path):
    onnx.save(_mlp(), tmp_path / "m.onnx")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    passes = "cleanup,prune:ratio=0.5"
    recorded = _optimize_cli("m.onnx", "--passes", passes, "-o", "a/out.onnx", "--report", "r.json", cwd=tmp_path)
    assert recorded.returncode == 0, recorded.stderr
    assert "2:prune:ratio=0.5/whole model kept" in json.loads((tmp_path / "r.json").read_text())["decisions"]["values"]
    replayed = _optimize_cli("m.onnx", "--passes", passes, "-o", "b/out.onnx", "--decisions", "r.json", cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert "decisions_replayed=1" in replayed.stdout
    assert (tmp_path / "a" / "out.onnx").read_bytes() == (tmp_path / "b" / "out.onnx").read_bytes()


def test_cli_replays_a_reports_decisions_into_byte_identical_files_and_refuses_another_pipelines(tmp_path):
    onnx.save(_mlp(), tmp_path / "m.onnx")
    report = {"verification": {"seed": 7}, **_quantized_record("3:quant")}
    (tmp_path / "r.json").write_text(json.dumps(report))
    passes = "cleanup,fuse,quant"
    for name in ("a.onnx", "b.onnx"):
        args = ("--passes", passes, "-o", name, "--decisions", "r.json", "--explain")
        result = _optimize_cli("m.onnx", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "decisions_replayed=2" in result.stdout and "as --decisions r.json records, not timed" in result.stdout
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert op_counts(load_model(str(tmp_path / "a.onnx")))["DynamicQuantizeMatMul"] == 2

    other = _optimize_cli("m.onnx", "--passes", "quant", "-q", "--decisions", "r.json", cwd=tmp_path)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        "error: --decisions r.json has no decision '1:quant/MatMul layers': it was written by "
        "another pipeline or onnxforge version; run without it to measure again"
    ]


def test_cli_refuses_a_report_path_that_is_the_decisions_it_replays(tmp_path):
    onnx.save(_mlp(), tmp_path / "m.onnx")
    (tmp_path / "r.json").write_text(json.dumps(_quantized_record()))
    result = _optimize_cli("m.onnx", "--passes", "quant", "--decisions", "r.json", "--report", "r.json", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: --report r.json is the --decisions report")
