"""Outputs never replace an input, and a run writes all of them or none (real commands on models built here)."""

import hashlib
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import OnnxforgeError
from onnxforge.ir import load_model, save_model
from onnxforge.ir.output_set import OutputSet, signals_deferred
from test_cli import ONNXFORGE, OPTIMIZE, only_error_line, run_cli, succeeded


def _external_model(folder: Path, name: str = "model.onnx", weights: str | None = None) -> Path:
    """y = x @ W + b with W (64x64) and b in the external data file `weights` (default `<name>.data`)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, location=weights or f"{name}.data", size_threshold=0)
    return path


def _digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name -> sha256), so a test sees any file changed, added or removed."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --- outputs that would replace an input ------------------------------------------------------------------


def _onto_own_weights(folder: Path) -> list:
    model = _external_model(folder)
    return [*OPTIMIZE, model, "-o", folder / "model.onnx.data"]


def _weights_named_like_the_output(folder: Path) -> list:
    model = _external_model(folder, "in.onnx", weights="out.onnx.data")
    return [*OPTIMIZE, model, "-o", folder / "out.onnx"]


def _report_onto_weights(folder: Path) -> list:
    model = _external_model(folder)
    return [*OPTIMIZE, model, "-o", folder / "out.onnx", "--report", folder / "model.onnx.data"]


def _hard_link_as_output(folder: Path) -> list:
    model = _external_model(folder)
    os.link(model, folder / "another-name.onnx")
    return [*OPTIMIZE, model, "-o", folder / "another-name.onnx"]


def _hard_link_of_weights_as_report(folder: Path) -> list:
    model = _external_model(folder)
    os.link(folder / "model.onnx.data", folder / "report.json")
    return [*OPTIMIZE, model, "--report", folder / "report.json"]


def _symlink_to_weights_as_output(folder: Path) -> list:
    model = _external_model(folder)
    (folder / "link.onnx").symlink_to(folder / "model.onnx.data")
    return [*OPTIMIZE, model, "-o", folder / "link.onnx"]


def _bench_json_onto_weights(folder: Path) -> list:
    model = _external_model(folder)
    return [*ONNXFORGE, "bench", model, "--json", folder / "model.onnx.data", "--min-time", "0", "--repeats", "1"]


def _compare_json_onto_candidate_weights(folder: Path) -> list:
    reference = _external_model(folder, "reference.onnx")
    candidate = _external_model(folder, "candidate.onnx")
    return [*ONNXFORGE, "compare", reference, candidate, "--json", folder / "candidate.onnx.data"]


def _data_file_as_report(folder: Path) -> list:
    model = _external_model(folder)
    np.savez(folder / "samples.npz", x=np.ones((2, 2, 64), np.float32))
    return [*OPTIMIZE, model, "--data", folder, "-o", folder / "out.onnx", "--report", folder / "samples.npz"]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(_onto_own_weights, id="o-onto-the-inputs-weights"),
        pytest.param(_weights_named_like_the_output, id="input-weights-in-out.onnx.data"),
        pytest.param(_report_onto_weights, id="report-onto-the-inputs-weights"),
        pytest.param(_hard_link_as_output, id="hard-link-of-the-input-as-o"),
        pytest.param(_hard_link_of_weights_as_report, id="hard-link-of-the-weights-as-report"),
        pytest.param(_symlink_to_weights_as_output, id="symlink-to-the-weights-as-o"),
        pytest.param(_bench_json_onto_weights, id="bench-json-onto-the-weights"),
        pytest.param(_compare_json_onto_candidate_weights, id="compare-json-onto-the-candidates-weights"),
        pytest.param(_data_file_as_report, id="report-onto-a-data-file"),
    ],
)
def test_an_output_that_is_an_input_file_is_refused_and_every_input_stays_byte_identical(tmp_path, command):
    argv = command(tmp_path)
    before = _digests(tmp_path)

    line = only_error_line(run_cli(argv))

    assert "input" in line and "never modified" in line
    assert _digests(tmp_path) == before


@pytest.mark.parametrize(
    ("outputs", "names"),
    [
        pytest.param({"-o": "same", "--report": "same"}, ("-o", "--report"), id="o-and-report"),
        pytest.param({"-o": "out.onnx", "--report": "out.onnx.data"}, ("--report", "-o's weights"), id="report-o-data"),
    ],
)
def test_two_outputs_on_one_file_are_refused_naming_both(tmp_path, outputs, names):
    model = _external_model(tmp_path)
    before = _digests(tmp_path)

    line = only_error_line(run_cli(OPTIMIZE, model, *(a for o, name in outputs.items() for a in (o, tmp_path / name))))

    assert all(name in line for name in names), line
    assert "each output its own path" in line
    assert _digests(tmp_path) == before


def test_model_with_external_weights_is_optimized_with_its_weights_file_and_no_temporary_file(tmp_path):
    model = _external_model(tmp_path)
    out = tmp_path / "out"

    succeeded(run_cli(OPTIMIZE, model, "-q", "-o", out / "model.opt.onnx", "--report", out / "report.json"))

    assert sorted(p.name for p in out.iterdir()) == ["model.opt.onnx", "model.opt.onnx.data", "report.json"]


def _without_root_override(command: list) -> list:
    """`command` run so that folder permissions bind it: as root, without the capabilities that override them."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and setpriv (to drop root's override of permissions) is not installed")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *map(str, command)]


def test_report_into_a_read_only_folder_fails_before_any_output_is_written(tmp_path):
    model = _external_model(tmp_path)
    out, reports = tmp_path / "out", tmp_path / "reports"
    out.mkdir()
    reports.mkdir()
    reports.chmod(0o555)
    try:
        command = [*OPTIMIZE, model, "-q", "-o", out / "model.opt.onnx", "--report", reports / "report.json"]
        line = only_error_line(run_cli(_without_root_override(command)))
    finally:
        reports.chmod(0o755)

    assert "--report" in line and "cannot write" in line
    assert list(out.iterdir()) == [] and list(reports.iterdir()) == []


def test_outputs_in_folders_that_do_not_exist_yet_are_written_there(tmp_path):
    model = _external_model(tmp_path)
    output, report = tmp_path / "a" / "b" / "m.onnx", tmp_path / "r" / "r.json"

    succeeded(run_cli(OPTIMIZE, model, "-q", "-o", output, "--report", report))

    assert output.is_file() and report.is_file()


# --- options out of range are usage errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        pytest.param(["optimize", "m.onnx", "--rtol", "-1"], "--rtol", id="negative-rtol"),
        pytest.param(["optimize", "m.onnx", "--rtol", "nan"], "--rtol", id="nan-rtol"),
        pytest.param(["optimize", "m.onnx", "--rtol", "inf"], "--rtol", id="infinite-rtol"),
        pytest.param(["optimize", "m.onnx", "--threads", "0"], "--threads", id="zero-threads"),
        pytest.param(["compare", "a.onnx", "b.onnx", "--samples", "0"], "--samples", id="zero-samples"),
        pytest.param(["bench", "m.onnx", "--threads", "-2"], "--threads", id="negative-bench-threads"),
        pytest.param(["bench", "m.onnx", "--warmup", "-1"], "--warmup", id="negative-warmup"),
        pytest.param(["bench", "m.onnx", "--repeats", "-1"], "--repeats", id="negative-repeats"),
        pytest.param(["bench", "m.onnx", "--min-time", "-1"], "--min-time", id="negative-min-time"),
        pytest.param(["bench", "m.onnx", "--min-time", "nan"], "--min-time", id="nan-min-time"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(arguments, option):
    result = run_cli(ONNXFORGE, *arguments)

    assert result.returncode == 2
    assert option in only_error_line(result)


# --- the output set itself (the API) ------------------------------------------------------------------------


def test_save_model_writes_model_and_weights_file_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "in").mkdir()
    model = load_model(_external_model(tmp_path / "in"))

    save_model(model, tmp_path / "out" / "m.onnx", external_data=True)

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx.data"]
    assert onnx.load(str(tmp_path / "out" / "m.onnx")).graph.node[0].op_type == "MatMul"


def test_staged_files_and_the_folders_made_for_them_vanish_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError), OutputSet() as outputs:
        outputs.stage_file(tmp_path / "new" / "deeper" / "a.onnx").write_bytes(b"model")
        outputs.stage_file(tmp_path / "b.json").write_text("{}")
        (outputs.stage_folder(tmp_path) / "lib.so").write_bytes(b"library")
        raise RuntimeError("a pass failed")

    assert list(tmp_path.iterdir()) == []


def test_commit_renames_every_staged_file_into_place(tmp_path):
    with OutputSet() as outputs:
        outputs.stage_file(tmp_path / "a.onnx").write_bytes(b"model")
        (outputs.stage_folder(tmp_path / "lib") / "lib.so").write_bytes(b"library")
        outputs.commit()

    assert _digests(tmp_path).keys() == {"a.onnx", "lib/lib.so"}


def test_commit_refuses_a_staged_file_that_would_replace_an_input(tmp_path):
    (tmp_path / "in.onnx").write_bytes(b"input")

    with pytest.raises(OnnxforgeError, match="never modified"), OutputSet(inputs=[tmp_path / "in.onnx"]) as outputs:
        outputs.stage_file(tmp_path / "out.json").write_text("{}")
        (outputs.stage_folder(tmp_path) / "in.onnx").write_bytes(b"what an exporter wrote beside its library")
        outputs.commit()

    assert _digests(tmp_path) == {"in.onnx": hashlib.sha256(b"input").hexdigest()}


def test_sigint_during_a_deferred_block_arrives_when_the_block_ends():
    # Python's own SIGINT handler, whatever the suite was started with: a shell's background job ignores SIGINT.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                finished.append("block")
            finished.append("after")
    finally:
        signal.signal(signal.SIGINT, previous)

    assert finished == ["block"]


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        pytest.param('{"rtol": -1}', "rtol", id="negative-rtol"),
        pytest.param('{"rtol": NaN}', "rtol", id="nan-rtol"),
        pytest.param('{"threads": 0}', "threads", id="zero-threads"),
    ],
)
def test_config_values_out_of_range_are_one_error_line(tmp_path, setting, key):
    (tmp_path / "pipeline.json").write_text(setting)

    line = only_error_line(run_cli(OPTIMIZE, _external_model(tmp_path), "--config", tmp_path / "pipeline.json"))

    assert key in line and "pipeline.json" in line
