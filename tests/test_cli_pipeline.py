"""What build pipelines use of `optimize`: --version, --json, --fail-if, --print-config, exit codes, config errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from onnx import helper

from onnxforge.cli import EXIT_CONDITION_HOLDS, EXIT_ERROR, EXIT_NO_IMPROVEMENT, EXIT_USAGE, optimize_main
from onnxforge.config import ConfigError, PipelineConfig, dump_config, load_config
from onnxforge.data import save_samples
from test_cli import ONNXFORGE, OPTIMIZE, _model, _save, _sha256, _single_node_model, _x, only_error_line, run_cli
from test_cli import succeeded

DOC = Path(__file__).resolve().parent.parent / "docs" / "build-pipelines.md"


def _optimize(capsys, *args) -> tuple[int, str, str]:
    """Run `optimize` in this process: its exit code (a usage error's too), stdout and stderr."""
    try:
        code = optimize_main([str(arg) for arg in args])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json_stdout(result) -> dict:
    """The one JSON object a --json run prints: the whole of stdout, nothing before or after it."""
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


# --- --version and the exit codes in --help ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[*OPTIMIZE, "--version"], [*ONNXFORGE, "--version"], [*ONNXFORGE, "optimize", "--version"]],
    ids=["optimize", "onnxforge", "onnxforge-optimize"],
)
def test_version_is_the_installed_package_version(command):
    result = succeeded(run_cli(command))
    assert result.stdout == f"onnxforge {metadata.version('onnxforge')}\n"


def test_optimize_help_lists_the_exit_codes():
    result = succeeded(run_cli(OPTIMIZE, "--help"))
    codes = result.stdout.split("exit codes")[1]
    for code, meaning in [(EXIT_ERROR, "an error"), (EXIT_USAGE, "usage error"),
                          (EXIT_NO_IMPROVEMENT, "--require-improvement"), (EXIT_CONDITION_HOLDS, "--fail-if")]:
        assert any(line.split()[:1] == [str(code)] and meaning in line for line in codes.splitlines()), codes


# --- --json -------------------------------------------------------------------------------------------------


def test_json_prints_the_report_with_status_figures_and_exit_code_alone_on_stdout(tmp_path):
    model = _save(_model(), tmp_path / "model.onnx")
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"

    # --explain prints on stdout without --json: with it, there too the text goes to stderr.
    result = succeeded(run_cli(OPTIMIZE, model, "-o", out, "--report", report_path, "--json", "--explain"))

    payload = _json_stdout(result)
    assert (payload["status"], payload["exit_code"]) == ("ok", 0)
    assert (payload["input"], payload["output"]) == (str(model), str(out))
    assert [(p["name"], p["status"]) for p in payload["passes"]] == [("cleanup", "applied")]
    assert payload["size"]["before"]["nodes"] == 5 and payload["size"]["after"]["nodes"] == 2
    assert payload["figures"]["cosine"] > 0.9999 and payload["figures"]["max_rel"] < 1e-4
    assert payload["figures"]["size_ratio"] == pytest.approx(payload["size"]["bytes_ratio"], abs=1e-6)
    assert payload["figures"]["latency_ratio"] is None and payload["latency"] is None  # no --measure
    assert payload["fail_if"] == []
    # The rest is the --report itself.
    report = json.loads(report_path.read_text())
    assert {key: payload[key] for key in report} == report
    assert "cleanup" in result.stderr and "identity" in result.stderr  # the summary and --explain's notes


def test_json_of_a_measured_run_gives_its_latency_figures(tmp_path):
    model = _save(_model(), tmp_path / "model.onnx")

    result = succeeded(run_cli(OPTIMIZE, model, "--measure", "--json", "--fail-if", "latency_ratio>1000"))

    payload = _json_stdout(result)
    latency, figures = payload["latency"], payload["figures"]
    assert figures["latency_ratio"] == pytest.approx(latency["after"]["median_ms"] / latency["before"]["median_ms"])
    assert figures["speedup"] == pytest.approx(latency["speedup"])
    [verdict] = payload["fail_if"]
    assert verdict == {"condition": "latency_ratio>1000", "figure": "latency_ratio",
                       "value": figures["latency_ratio"], "holds": False}
    assert payload["output"] is None  # no -o


def test_json_says_unchanged_when_no_pass_changed_the_model(tmp_path):
    model = _save(_single_node_model(helper.make_node("Relu", ["x"], ["y"]), [2, 8]), tmp_path / "relu.onnx")

    payload = _json_stdout(succeeded(run_cli(OPTIMIZE, model, "--json", "-q")))

    assert (payload["status"], payload["exit_code"]) == ("unchanged", 0)
    assert [p["status"] for p in payload["passes"]] == ["unchanged"]


def test_json_of_a_failed_run_is_an_object_with_its_error_and_exit_code(tmp_path):
    result = run_cli(OPTIMIZE, tmp_path / "missing.onnx", "-o", tmp_path / "out.onnx", "--json")

    line = only_error_line(result)
    assert result.returncode == EXIT_ERROR
    assert _json_stdout(result) == {"status": "failed", "exit_code": EXIT_ERROR,
                                    "input": str(tmp_path / "missing.onnx"), "output": None,
                                    "error": line.removeprefix("error: ")}


def test_json_of_a_search_is_its_report_with_status_and_exit_code(tmp_path):
    model = _save(_model(), tmp_path / "model.onnx")
    out = tmp_path / "best.onnx"

    result = run_cli(OPTIMIZE, model, "--auto", "--passes", "cleanup", "--trials", 1, "--min-speedup", 1000,
                     "--require-improvement", "-o", out, "--json")

    assert result.returncode == EXIT_NO_IMPROVEMENT
    payload = _json_stdout(result)
    assert (payload["status"], payload["exit_code"], payload["improved"]) == ("failed", EXIT_NO_IMPROVEMENT, False)
    assert (payload["input"], payload["output"]) == (str(model), str(out))
    assert payload["winner"] is None and payload["counts"]["trials"] == 1
    assert "search:" in result.stderr


# --- --fail-if ----------------------------------------------------------------------------------------------


def test_a_fail_if_that_holds_exits_4_and_writes_nothing(tmp_path, capsys):
    model = _save(_model(), tmp_path / "model.onnx")
    digest = _sha256(model)
    out = tmp_path / "out"
    out.mkdir()

    code, stdout, stderr = _optimize(capsys, model, "-o", out / "m.onnx", "--report", out / "r.json",
                                     "--fail-if", "cosine<0.5", "--fail-if", "size_ratio > 0.5", "--json")

    assert code == EXIT_CONDITION_HOLDS
    payload = json.loads(stdout)
    size_ratio = payload["figures"]["size_ratio"]
    assert 0.5 < size_ratio < 1  # cleanup folds b * 2: a few bytes fewer
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --fail-if size_ratio>0.5 holds: size_ratio={size_ratio:.6g}"]
    assert (payload["status"], payload["exit_code"], payload["output"]) == ("failed", EXIT_CONDITION_HOLDS, None)
    verdicts = [(verdict["condition"], verdict["holds"]) for verdict in payload["fail_if"]]
    assert verdicts == [("cosine<0.5", False), ("size_ratio>0.5", True)]
    assert list(out.iterdir()) == [] and _sha256(model) == digest


def test_fail_if_conditions_that_do_not_hold_let_the_run_write_its_outputs(tmp_path, capsys):
    model = _save(_model(), tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"

    code, _, stderr = _optimize(capsys, model, "-o", out, "--fail-if", "cosine<0.99", "--fail-if", "max_rel>=0.01",
                                "--fail-if", "size_ratio>1")

    assert code == 0, stderr
    assert out.is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--fail-if", "latency>1.0"], "unknown figure 'latency'", id="unknown-figure"),
        pytest.param(["--fail-if", "cosine=0.99"], "FIGURE<BOUND", id="no-operator"),
        pytest.param(["--fail-if", "cosine<high"], "finite number", id="bad-bound"),
        pytest.param(["--fail-if", "cosine<nan"], "finite number", id="nan-bound"),
        pytest.param(["--fail-if", "latency_ratio>1.0"], "--measure", id="latency-without-measure"),
        pytest.param(["--fail-if", "speedup<1"], "--measure", id="speedup-without-measure"),
        pytest.param(["--no-verify", "--fail-if", "cosine<0.99"], "--no-verify", id="cosine-without-verification"),
        pytest.param(["--auto", "--fail-if", "size_ratio>1"], "--require-improvement", id="with-auto"),
    ],
)
def test_a_fail_if_the_run_cannot_test_is_a_usage_error_before_any_work(tmp_path, capsys, flags, message):
    model = _save(_model(), tmp_path / "model.onnx")
    out = tmp_path / "out"
    out.mkdir()

    code, _, stderr = _optimize(capsys, model, *flags, "-o", out / "m.onnx")

    assert code == EXIT_USAGE
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert message in line
    if "figure" in message:
        assert "latency_ratio, speedup, size_ratio, cosine, max_rel" in line
    assert "[1/1]" not in stderr  # refused before the passes ran
    assert list(out.iterdir()) == []


def test_a_fail_if_on_a_figure_this_model_lacks_is_a_usage_error_and_writes_nothing(tmp_path, capsys):
    model = _save(_single_node_model(helper.make_node("Relu", ["x"], ["y"]), [2, 8]), tmp_path / "relu.onnx")
    out = tmp_path / "out.onnx"

    code, _, stderr = _optimize(capsys, model, "-o", out, "--fail-if", "size_ratio>1")  # no weights: no ratio

    assert code == EXIT_USAGE
    assert "gives no size_ratio" in stderr
    assert not out.exists()


# --- --print-config -----------------------------------------------------------------------------------------

CONFIG = """
passes = ["remove-identity", { name = "fold-constants", max_bytes = 4096 }]
output = "out/opt.onnx"
report = "out/report.json"
data = "samples.npz"
budget = "metric=metrics.py:accuracy>=0.9"
plugins = ["my_passes.py", "an_installed_module"]
shapes = { x = [3, 8] }
seed = 7
threads = 2
"""


def test_print_config_merges_file_and_flags_and_reads_back_to_the_same_config(tmp_path, capsys, monkeypatch):
    tmp_path = tmp_path.resolve()  # printed paths are resolved
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "pipeline.toml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)  # paths on the command line are relative to here, the file's to its folder

    code, printed, stderr = _optimize(capsys, "--config", "cfg/pipeline.toml", "--seed", "3", "-o", "here.onnx",
                                      "--shape", "y=1x2", "--no-verify", "--print-config")

    assert code == 0, stderr
    config = json.loads(printed)
    assert config["output"] == str(tmp_path / "here.onnx")  # the flag wins, made absolute
    assert config["report"] == str(folder / "out" / "report.json")  # the file's, relative to the file
    assert config["data"] == str(folder / "samples.npz")
    assert config["budget"] == f"metric={folder / 'metrics.py'}:accuracy>=0.9"
    assert config["plugins"] == [str(folder / "my_passes.py"), "an_installed_module"]
    assert config["passes"] == ["remove-identity", {"name": "fold-constants", "max_bytes": 4096}]
    assert config["shapes"] == {"x": [3, 8], "y": [1, 2]}
    assert (config["seed"], config["threads"], config["verify"]) == (3, 2, False)
    assert config["on_error"] == "rollback"  # the defaults are part of the effective config
    assert not (tmp_path / "here.onnx").exists() and not (folder / "out").exists()  # nothing ran

    # Kept anywhere and given back, it is the same effective config.
    elsewhere = tmp_path / "elsewhere" / "printed.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(printed)
    code, again, stderr = _optimize(capsys, "--config", elsewhere, "--print-config")
    assert code == 0, stderr
    assert again == printed


def test_dump_config_reads_back_to_the_same_config(tmp_path):
    config = PipelineConfig(passes=["cleanup", ("prune", {"ratio": 0.3})], output=str(tmp_path / "o.onnx"),
                            decisions={"values": {"prune": 0.3}}, rtol=0.001, measure=True, plugins=[])
    path = tmp_path / "config.json"
    path.write_text(dump_config(config))

    assert load_config(path) == dataclasses.replace(config, plugins=None)  # an empty list is left out: unset


# --- config file errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("pases", "passes"), ("on-eror", "on_error"), ("measured", "measure"), ("colour", None)],
)
def test_unknown_config_key_is_named_with_the_closest_known_key(tmp_path, key, suggestion):
    config = tmp_path / "bad.toml"
    config.write_text(f"{key} = 1\n")

    with pytest.raises(ConfigError) as error:
        load_config(config)

    message = str(error.value)
    assert message.startswith(f"unknown key '{key}' in config file '{config}'")
    assert (f"did you mean '{suggestion}'?" in message) if suggestion else ("did you mean" not in message)
    assert "known: backend, budget, data," in message


def test_unknown_config_key_on_the_command_line_suggests_the_closest_key(tmp_path):
    model = _save(_model(), tmp_path / "model.onnx")
    config = tmp_path / "bad.toml"
    config.write_text("outptu = 'o.onnx'\n")

    line = only_error_line(run_cli(OPTIMIZE, model, "--config", config))

    assert "unknown key 'outptu'" in line and "did you mean 'output'?" in line


# --- the documented CI step ---------------------------------------------------------------------------------


def test_the_documented_ci_step_prints_the_figures_and_exits_with_the_runs_code(tmp_path):
    scripts = Path(sys.executable).parent
    if not (scripts / "optimize").exists():
        pytest.skip(f"no `optimize` console script beside {sys.executable} (package not installed)")
    step = re.search(r"<!-- ci-step -->\n```sh\n(.*?)\n```", DOC.read_text(), re.DOTALL)[1]
    _save(_model(), tmp_path / "model.onnx")
    save_samples(tmp_path / "calib", [{"x": _x(seed=seed)} for seed in range(8)], layout="folder")
    environment = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ['PATH']}"}

    result = subprocess.run(["bash", "-e", "-c", step], cwd=tmp_path, capture_output=True, text=True,
                            env=environment, timeout=300)

    run = json.loads((tmp_path / "optimize.json").read_text())
    assert result.returncode == run["exit_code"] and run["exit_code"] in (0, EXIT_CONDITION_HOLDS), result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{run['status']}: latency x") and "worst cosine" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["latency_ratio>1.0", "cosine<0.99"]
    assert (tmp_path / "model.opt.onnx").exists() == (run["exit_code"] == 0)
