"""The `optimize` and `onnxforge` commands, run as real subprocesses on small models built here."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.data import save_samples

ONNXFORGE = [sys.executable, "-m", "onnxforge.cli"]
OPTIMIZE = [sys.executable, "-c", "import sys; from onnxforge.cli import optimize_main; sys.exit(optimize_main())"]
ADD_TO_SUB_PLUGIN = Path(__file__).parent / "plugins_fixtures" / "add_to_sub.py"

_W = np.random.default_rng(7).standard_normal((8, 3)).astype(np.float32)
_B = np.arange(3, dtype=np.float32)


def _model(batch: int | str = 2, bias_shift: float = 0.0) -> onnx.ModelProto:
    """y = Identity(x) @ W + b * 2 with x of shape (batch, 8), plus a dead Relu branch.

    Cleanup removes the Identity and the Relu and folds b * 2: 5 nodes become MatMul and Add.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["x_copy"]),
            helper.make_node("MatMul", ["x_copy", "W"], ["h"]),
            helper.make_node("Mul", ["b", "two"], ["b2"]),
            helper.make_node("Add", ["h", "b2"], ["y"]),
            helper.make_node("Relu", ["h"], ["unused"]),
        ],
        "identity_and_dead_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        initializer=[
            numpy_helper.from_array(_W, "W"),
            numpy_helper.from_array(_B + np.float32(bias_shift), "b"),
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _single_node_model(node: onnx.NodeProto, x_shape, w_shape=None) -> onnx.ModelProto:
    initializers = [] if w_shape is None else [numpy_helper.from_array(np.ones(w_shape, np.float32), "W")]
    graph = helper.make_graph(
        [node],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run_cli(command: list, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with `args` (paths allowed) and `env` added to this process's environment."""
    environment = dict(os.environ)
    environment.pop("ONNXFORGE_DEBUG", None)  # that variable turns error lines back into tracebacks
    environment.update(env or {})
    return subprocess.run(
        [*map(str, command), *map(str, args)], capture_output=True, text=True, env=environment, timeout=300
    )


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Check a run exited 0 without a traceback; return it."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def only_error_line(result: subprocess.CompletedProcess) -> str:
    """Check a failed run printed exactly one `error:` line and no traceback; return that line."""
    assert result.returncode != 0, f"expected a failure\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "internal error" not in errors[0], errors[0]
    return errors[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _x(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 8)).astype(np.float32)


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


# --- optimize: the happy paths ---------------------------------------------------------------------------


def test_optimize_cleanup_writes_model_and_report_and_never_touches_the_input(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    digest = _sha256(model_path)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"

    succeeded(run_cli(OPTIMIZE, model_path, "--passes", "cleanup", "-o", out, "--report", report_path))

    assert _sha256(model_path) == digest
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(_ops(out)) == ["Add", "MatMul"]
    x = _x(seed=1)
    np.testing.assert_allclose(_outputs(out, x), _outputs(model_path, x), rtol=1e-5, atol=1e-6)

    report = json.loads(report_path.read_text())
    assert report["output"] == str(out)
    assert report["size"]["before"]["nodes"] == 5
    assert report["size"]["after"]["nodes"] == 2
    assert report["size"]["before"]["bytes"] > 0 and report["size"]["after"]["bytes"] > 0
    [cleanup] = report["passes"]
    assert cleanup["name"] == "cleanup"
    assert cleanup["status"] == "applied"
    assert cleanup["seconds"] >= 0
    assert cleanup["stats"]["identity_nodes_removed"] == 1
    assert "nodes_removed" in cleanup["stats"]
    assert report["error_vs_original"]["max_rel"] <= 1e-4
    assert report["error_vs_original"]["outputs"][0]["name"] == "y"
    assert report["latency"] is None


@pytest.mark.parametrize(
    "command", [[*OPTIMIZE, "--list-passes"], [*ONNXFORGE, "list-passes"]], ids=["optimize", "onnxforge"]
)
def test_list_passes_shows_cleanup_with_its_docstring_line(command):
    from onnxforge.passes.cleanup import Cleanup

    result = succeeded(run_cli(command))

    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert {"cleanup", "remove-dead", "remove-identity", "fold-constants"} <= set(lines)
    assert "lossless" in lines["cleanup"]
    assert Cleanup.summary() and Cleanup.summary() in lines["cleanup"]


def test_optimize_console_script_is_installed_and_lists_passes():
    script = Path(sys.executable).parent / "optimize"
    if not script.exists():
        pytest.skip(f"no `optimize` console script beside {sys.executable} (package not installed)")
    result = succeeded(run_cli([script], "--list-passes"))
    assert any(line.startswith("cleanup ") for line in result.stdout.splitlines())


def test_optimize_runs_a_comma_separated_pass_list_in_order(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    passes = "remove-dead,remove-identity"

    succeeded(run_cli(OPTIMIZE, model_path, "--passes", passes, "-o", out, "--report", report_path))

    report = json.loads(report_path.read_text())
    assert [(p["name"], p["status"]) for p in report["passes"]] == [
        ("remove-dead", "applied"),
        ("remove-identity", "applied"),
    ]
    assert report["passes"][0]["stats"]["dead_nodes_removed"] == 1
    assert report["passes"][1]["stats"]["identity_nodes_removed"] == 1
    assert sorted(_ops(out)) == ["Add", "MatMul", "Mul"]


def test_optimize_passes_options_to_the_pass_and_names_them_in_the_report(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    passes = "fold-constants:max_bytes=2048"

    succeeded(run_cli(OPTIMIZE, model_path, "--passes", passes, "-o", out, "--report", report_path))

    [record] = json.loads(report_path.read_text())["passes"]
    assert record["name"] == "fold-constants:max_bytes=2048"
    assert record["status"] == "applied"
    assert record["stats"]["tensors_made_constant"] == 1
    assert "Mul" not in _ops(out)
    x = _x(seed=2)
    np.testing.assert_allclose(_outputs(out, x), _outputs(model_path, x), rtol=1e-5, atol=1e-6)


def test_optimize_measure_reports_latency_before_and_after_and_speedup(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    report_path = tmp_path / "report.json"

    result = succeeded(run_cli(OPTIMIZE, model_path, "--measure", "--report", report_path))

    latency = json.loads(report_path.read_text())["latency"]
    assert latency["setup"]["backend"] == "ort" and latency["setup"]["target"] == "cpu"
    for side in ("before", "after"):
        assert latency[side]["median_ms"] > 0
        assert latency[side]["p90_ms"] >= latency[side]["min_ms"] > 0
        assert latency[side]["repeats"] >= 1
    assert latency["speedup"] > 0
    assert "latency median" in result.stdout
    assert "not saved" in result.stdout  # no -o: the summary says the model was not written


# --- bench and compare -----------------------------------------------------------------------------------


def test_bench_prints_median_p90_and_spread_and_writes_json(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    json_path = tmp_path / "bench.json"

    result = succeeded(
        run_cli(
            ONNXFORGE, "bench", model_path, "--backend", "ort", "--target", "cpu",
            "--min-time", "0.05", "--repeats", "5", "--json", json_path,
        )
    )  # fmt: skip

    for word in ("median", "p90", "spread"):
        assert word in result.stdout
    data = json.loads(json_path.read_text())
    assert data["backend"] == "ort" and data["target"] == "cpu"
    assert data["latency"]["repeats"] >= 5
    assert data["latency"]["median_ms"] > 0
    assert data["latency"]["spread"] >= 0
    assert data["environment"]["onnxruntime"] == ort.__version__


def test_bench_fixes_dynamic_dims_from_shape_and_checks_them_against_the_model(tmp_path):
    model_path = _save(_model(batch="batch"), tmp_path / "dynamic.onnx")
    json_path = tmp_path / "bench.json"
    common = ["--min-time", "0.05", "--repeats", "5"]

    result = succeeded(run_cli(ONNXFORGE, "bench", model_path, "--shape", "x=2x8", *common, "--json", json_path))
    assert "median" in result.stdout
    assert json.loads(json_path.read_text())["latency"]["median_ms"] > 0

    # The shape is really used: one that contradicts the model's fixed axis is refused.
    assert "axis 1" in only_error_line(run_cli(ONNXFORGE, "bench", model_path, "--shape", "x=2x9", *common))


def test_compare_prints_max_errors_cosine_and_top1_agreement(tmp_path):
    reference = _save(_model(), tmp_path / "a.onnx")
    candidate = _save(_model(bias_shift=0.5), tmp_path / "b.onnx")
    json_path = tmp_path / "compare.json"

    result = succeeded(run_cli(ONNXFORGE, "compare", reference, candidate, "--json", json_path))

    assert "4 input sets (random)" in result.stdout
    [line] = [line for line in result.stdout.splitlines() if line.strip().startswith("y:")]
    for metric in ("max abs", "max rel", "cosine", "top-1 agreement"):
        assert metric in line
    comparison = json.loads(json_path.read_text())
    # b is shifted by 0.5 and doubled: every output element moves by exactly 1.
    assert comparison["max_abs"] == pytest.approx(1.0, rel=1e-5)
    assert comparison["min_top1_agreement"] is not None


def test_compare_runs_on_samples_from_data(tmp_path):
    reference = _save(_model(batch="batch"), tmp_path / "a.onnx")
    samples = tmp_path / "samples.npz"
    save_samples(samples, [{"x": _x(batch=1, seed=i)} for i in range(3)])

    result = succeeded(run_cli(ONNXFORGE, "compare", reference, reference, "--data", samples))

    assert "3 input sets (--data)" in result.stdout
    assert "max abs 0 " in result.stdout


# --- bad input: one error line, non-zero exit, nothing written ---------------------------------------------


def _write_outputs(out: Path) -> list:
    return ["-o", out / "model.opt.onnx", "--report", out / "report.json"]


def _optimize_file(content: bytes | onnx.ModelProto | None):
    """A case that runs optimize on a file holding `content`; None: on a file that does not exist."""

    def case(tmp: Path, out: Path) -> list:
        path = tmp / "input.onnx"
        if isinstance(content, onnx.ModelProto):
            _save(content, path)
        elif content is not None:
            path.write_bytes(content)
        return [*OPTIMIZE, path, *_write_outputs(out)]

    return case


def _optimize_with(*extra: str, batch: int | str = 2):
    def case(tmp: Path, out: Path) -> list:
        return [*OPTIMIZE, _save(_model(batch=batch), tmp / "model.onnx"), *extra, *_write_outputs(out)]

    return case


def _bench_with(*extra: str):
    def case(tmp: Path, out: Path) -> list:
        model_path = _save(_model(batch="batch"), tmp / "model.onnx")
        return [*ONNXFORGE, "bench", model_path, "--min-time", "0", "--repeats", "1", *extra, "--json", out / "b.json"]

    return case


def _compare_with(*extra: str):
    def case(tmp: Path, out: Path) -> list:
        model_path = _save(_model(batch="batch"), tmp / "model.onnx")
        return [*ONNXFORGE, "compare", model_path, model_path, *extra, "--json", out / "c.json"]

    return case


BAD_INPUTS = [
    pytest.param(_optimize_file(None), "not found", id="missing-file"),
    pytest.param(_optimize_file(_model().SerializeToString()[:100]), "not a valid ONNX model", id="truncated-onnx"),
    pytest.param(_optimize_file(b"My notes, not a model.\nLine two.\n"), "not a valid ONNX", id="text-named-onnx"),
    pytest.param(_optimize_file(b""), "not an ONNX model", id="empty-file"),
    pytest.param(
        _optimize_file(numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString()),
        "ONNX model",
        id="tensor-proto-named-onnx",
    ),
    pytest.param(_optimize_with("--passes", "cleanup,no-such-pass"), "unknown pass 'no-such-pass'", id="unknown-pass"),
    pytest.param(_optimize_with("--passes", "fold-constants:max_bytes=abc"), "max_bytes", id="bad-option-value"),
    pytest.param(
        _optimize_with("--passes", "fold-constants:no_such_option=1"), "no option 'no_such_option'", id="unknown-option"
    ),
    pytest.param(
        _optimize_file(_single_node_model(helper.make_node("NoSuchOp", ["x"], ["y"]), [2, 8])),
        "onnxruntime cannot load",
        id="op-onnxruntime-lacks",
    ),
    pytest.param(
        _optimize_file(_single_node_model(helper.make_node("MatMul", ["x", "W"], ["y"]), [2, 8], w_shape=(5, 3))),
        "onnxruntime cannot load",
        id="matmul-shapes-mismatch",
    ),
    pytest.param(
        _optimize_file(helper.make_model(_model().graph, opset_imports=[helper.make_opsetid("", 99)])),
        "onnxruntime cannot load",
        id="opset-too-new",
    ),
    pytest.param(_optimize_with("--shape", "nosuch=2x8", batch="batch"), "nosuch", id="optimize-unknown-shape-name"),
    pytest.param(_bench_with("--shape", "nosuch=2x8"), "nosuch", id="bench-unknown-shape-name"),
    pytest.param(_optimize_with("--data", "/nonexistent/samples.npz"), "does not exist", id="optimize-missing-data"),
    pytest.param(_compare_with("--data", "/nonexistent/samples.npz"), "does not exist", id="compare-missing-data"),
    pytest.param(_optimize_with("--backend", "nosuch"), "unknown backend", id="optimize-unknown-backend"),
    pytest.param(
        _optimize_with("--backend", "nosuch", "--no-verify"), "unknown backend", id="optimize-unknown-backend-no-verify"
    ),
    pytest.param(_bench_with("--backend", "nosuch"), "unknown backend", id="bench-unknown-backend"),
    pytest.param(_compare_with("--backend", "nosuch"), "unknown backend", id="compare-unknown-backend"),
    pytest.param(_bench_with("--target", "cuda"), "no target 'cuda'", id="bench-ort-on-cuda"),
    pytest.param(_optimize_with("--target", "cuda"), "no target 'cuda'", id="optimize-ort-on-cuda"),
    pytest.param(_optimize_with("--plugin", "no_such_plugin_module"), "no_such_plugin_module", id="missing-plugin"),
    pytest.param(_optimize_with("--plugin", "/nonexistent/plugin.py"), "not found", id="missing-plugin-file"),
]


@pytest.mark.parametrize(("case", "message"), BAD_INPUTS)
def test_bad_input_gives_one_error_line_and_writes_nothing(tmp_path, case, message):
    out = tmp_path / "out"
    out.mkdir()
    command = case(tmp_path, out)

    line = only_error_line(run_cli(command))

    assert message in line
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize(
    "outputs",
    [
        pytest.param(lambda model, other: [*OPTIMIZE, model, "-o", model.parent / "." / model.name], id="optimize-o"),
        pytest.param(lambda model, other: [*OPTIMIZE, model, "--report", model], id="optimize-report"),
        pytest.param(lambda model, other: [*ONNXFORGE, "bench", model, "--json", model], id="bench-json"),
        pytest.param(lambda model, other: [*ONNXFORGE, "compare", other, model, "--json", model], id="compare-json"),
    ],
)
def test_output_path_naming_an_input_is_refused_and_the_input_stays_unchanged(tmp_path, outputs):
    folder = tmp_path / "models"
    folder.mkdir()
    model_path = _save(_model(), folder / "model.onnx")
    other_path = _save(_model(bias_shift=1.0), folder / "other.onnx")
    digest = _sha256(model_path)

    line = only_error_line(run_cli(outputs(model_path, other_path)))

    assert "input" in line and "never modified" in line
    assert _sha256(model_path) == digest
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "other.onnx"]


def test_model_and_report_on_the_same_path_is_refused_before_any_work(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    out = tmp_path / "out"
    out.mkdir()

    line = only_error_line(run_cli(OPTIMIZE, model_path, "-o", out / "same", "--report", out / "same"))

    assert "--report" in line and "-o" in line
    assert list(out.iterdir()) == []


def test_report_path_that_is_a_folder_is_refused_before_the_model_is_written(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    out = tmp_path / "out"
    (out / "reports").mkdir(parents=True)

    line = only_error_line(run_cli(OPTIMIZE, model_path, "-o", out / "model.opt.onnx", "--report", out / "reports"))

    assert "folder" in line
    assert [p.name for p in out.iterdir()] == ["reports"]
    assert list((out / "reports").iterdir()) == []


def test_output_under_a_path_that_is_a_file_is_one_error_line(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    (tmp_path / "not_a_folder").write_text("")

    line = only_error_line(run_cli(OPTIMIZE, model_path, "-o", tmp_path / "not_a_folder" / "out.onnx"))

    assert "not_a_folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "not_a_folder"]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        pytest.param([*OPTIMIZE], "no input model", id="optimize-without-model"),
        pytest.param([*ONNXFORGE], "required", id="onnxforge-without-command"),
        pytest.param([*ONNXFORGE, "shrink"], "invalid choice", id="onnxforge-unknown-command"),
        pytest.param([*OPTIMIZE, "m.onnx", "--no-such-flag"], "--no-such-flag", id="unknown-flag"),
        pytest.param([*OPTIMIZE, "m.onnx", "--on-error", "ignore"], "--on-error", id="bad-choice"),
        pytest.param([*ONNXFORGE, "bench", "m.onnx", "--repeats", "many"], "--repeats", id="bad-number"),
    ],
)
def test_usage_errors_are_one_error_line(command, message):
    line = only_error_line(run_cli(command))
    assert message in line


# --- a pass that breaks the model ------------------------------------------------------------------------


def test_on_error_stop_with_a_breaking_pass_fails_and_writes_nothing(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    out = tmp_path / "out"
    out.mkdir()

    result = run_cli(
        OPTIMIZE, model_path, "--plugin", ADD_TO_SUB_PLUGIN, "--passes", "test-add-to-sub",
        "--on-error", "stop", *_write_outputs(out),
    )  # fmt: skip

    line = only_error_line(result)
    assert "test-add-to-sub" in line and "relative error" in line
    assert list(out.iterdir()) == []


def test_on_error_rollback_reports_the_breaking_pass_and_keeps_the_model_numerically(tmp_path):
    model_path = _save(_model(), tmp_path / "model.onnx")
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"

    result = succeeded(
        run_cli(
            OPTIMIZE, model_path, "--plugin", ADD_TO_SUB_PLUGIN, "--passes", "cleanup,test-add-to-sub",
            "-o", out, "--report", report_path,
        )
    )  # fmt: skip

    cleanup, broken = json.loads(report_path.read_text())["passes"]
    assert cleanup["status"] == "applied"
    assert broken["name"] == "test-add-to-sub"
    assert broken["status"] == "rolled_back"
    assert "relative error" in broken["error"]
    assert "rolled_back" in result.stdout and "reason:" in result.stdout
    assert sorted(_ops(out)) == ["Add", "MatMul"]
    for seed in range(3):
        x = _x(seed=seed)
        np.testing.assert_allclose(_outputs(out, x), _outputs(model_path, x), rtol=1e-5, atol=1e-6)


def test_bench_on_tvm_compiles_and_times_and_takes_the_shape_of_a_dynamic_model(tmp_path):
    pytest.importorskip("tvm")
    common = ["--backend", "tvm", "--min-time", "0.05", "--repeats", "5"]
    static = _save(_model(), tmp_path / "model.onnx")
    assert "median" in succeeded(run_cli(ONNXFORGE, "bench", static, *common)).stdout
    dynamic = _save(_model(batch="batch"), tmp_path / "dynamic.onnx")
    assert "median" in succeeded(run_cli(ONNXFORGE, "bench", dynamic, "--shape", "x=2x8", *common)).stdout


def test_tvm_artifacts_from_bench_and_optimize_and_their_usage_errors(tmp_path):
    pytest.importorskip("tvm")
    model = _save(_model(), tmp_path / "model.onnx")
    result = succeeded(run_cli(ONNXFORGE, "bench", model, "--backend", "tvm", "--target", "cuda", "--compile-only",
                               "--artifact", tmp_path / "m_cuda.so"))
    assert "compiled for tvm cuda" in result.stdout
    assert json.loads((tmp_path / "m_cuda.json").read_text())["device"] == "cuda"
    succeeded(run_cli(OPTIMIZE, model, "--passes", "cleanup", "-o", tmp_path / "out.onnx", "--backend", "tvm",
                      "--artifact", tmp_path / "out_tvm.so", "--report", tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["artifact"] == [str(tmp_path / "out_tvm.so"), str(tmp_path / "out_tvm.json")]
    for args, message in (
        (["--backend", "ort", "--compile-only"], "does not compile models ahead of time"),
        (["--backend", "tvm", "--target", "aarch64"], "built for aarch64"),
        (["--backend", "tvm", "--tune", "rounds=3"], "--tune takes trials=N"),
        (["--backend", "tvm", "--compile-only", "--artifact", model], "is the input model"),
    ):
        assert message in only_error_line(run_cli(ONNXFORGE, "bench", model, *args))
