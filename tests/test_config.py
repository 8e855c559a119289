"""Pipeline config files: TOML and JSON, relative paths, command-line precedence, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.config import ConfigError, load_config


def _model_file(folder) -> str:
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Mul", ["two", "three"], ["six"]),
        helper.make_node("Mul", ["a", "six"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [
            numpy_helper.from_array(np.full(4, 2.0, np.float32), "two"),
            numpy_helper.from_array(np.full(4, 3.0, np.float32), "three"),
        ],
    )
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _optimize_cli(*args, cwd=None):
    code = "import sys; from onnxforge.cli import optimize_main; sys.exit(optimize_main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd)


TOML = """
passes = ["remove-identity", { name = "fold-constants", max_bytes = 4096 }]
output = "out/opt.onnx"
report = "out/report.json"
shapes = { x = [3, 4] }
on_error = "stop"
seed = 7
"""


def test_toml_config_runs_its_pipeline_with_paths_relative_to_the_file(tmp_path):
    model = _model_file(tmp_path)
    config = tmp_path / "cfg" / "pipeline.toml"
    config.parent.mkdir()
    config.write_text(TOML)
    done = _optimize_cli(model, "--config", str(config), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "cfg" / "out" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["remove-identity", "fold-constants:max_bytes=4096"]
    assert report["verification"]["seed"] == 7
    assert [n.op_type for n in onnx.load(tmp_path / "cfg" / "out" / "opt.onnx").graph.node] == ["Mul"]


def test_command_line_flags_override_the_config(tmp_path):
    model = _model_file(tmp_path)
    config = tmp_path / "pipeline.toml"
    config.write_text(TOML)
    out = tmp_path / "elsewhere.onnx"
    done = _optimize_cli(model, "--config", str(config), "--passes", "remove-identity", "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and not (tmp_path / "out" / "opt.onnx").exists()
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Mul", "Mul"]


def test_json_config_feeds_the_python_api(tmp_path):
    model = _model_file(tmp_path)
    config = tmp_path / "pipeline.json"
    config.write_text(json.dumps({"passes": "cleanup", "shapes": {"x": [2, 4]}, "seed": 3}))
    result, report = optimize(model, **load_config(config).optimize_kwargs())
    assert report.verification["seed"] == 3
    assert result.stats().nodes == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pases = ['cleanup']", "unknown key 'pases'"),
        ("seed = 'seven'", "key 'seed' in config file .* must be int"),
        ("verify = 1", "key 'verify' in config file .* must be bool"),
        ("on_error = 'ignore'", "must be one of rollback, stop"),
        ("passes = [{ max_bytes = 3 }]", "must be a string or a table with a 'name'"),
        ("passes = [", "cannot read config file"),
    ],
)
def test_bad_config_files_are_one_clear_error(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_bad_config_on_the_command_line_is_one_error_line(tmp_path):
    model = _model_file(tmp_path)
    config = tmp_path / "bad.toml"
    config.write_text("pases = ['cleanup']\n")
    done = _optimize_cli(model, "--config", str(config), "-o", str(tmp_path / "o.onnx"))
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: unknown key 'pases'")
    assert not (tmp_path / "o.onnx").exists()


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
