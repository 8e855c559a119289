"""Model files are untrusted input: external data stays inside the model's folder, tensor data fits its dims,
each value has one definition, and models are handed to onnxruntime without temporary files or links."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.errors import ModelLoadError
from onnxforge.frontends import ModelFile
from onnxforge.ir import load_model
from onnxforge.ir.runtime_source import IN_MEMORY_LOCATION, runtime_source_of

ONNXFORGE = [sys.executable, "-m", "onnxforge.cli"]
OPTIMIZE = [sys.executable, "-c", "import sys; from onnxforge.cli import optimize_main; sys.exit(optimize_main())"]
SECRET = b"ONNXFORGE-SECRET-" + bytes(range(256))
W = np.arange(4, dtype=np.float32)  # 16 bytes


def _model(initializers: list[TensorProto], nodes: list[onnx.NodeProto] | None = None, inputs=None) -> onnx.ModelProto:
    """y = x + w, x and y of shape [4]."""
    graph = helper.make_graph(
        nodes or [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(location: str, offset: str | None = None, length: str | None = None, dims=(4,)) -> TensorProto:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": offset, "length": length}
    for key, value in entries.items():
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


def _raw(dims, data: bytes, name: str = "w") -> TensorProto:
    return TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims), raw_data=data)


def _write(folder: Path, model: onnx.ModelProto) -> Path:
    (folder / "w.bin").write_bytes(W.tobytes())
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def layout(tmp_path) -> Path:
    """`model/` (the model's folder), `outside/secret.bin` (never to be read) and `out/` (for outputs)."""
    for name in ("model", "outside", "out"):
        (tmp_path / name).mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(SECRET * 4)
    return tmp_path


def _symlinked_file(root: Path) -> onnx.ModelProto:
    (root / "model" / "link.bin").symlink_to(root / "outside" / "secret.bin")
    return _model([_external("link.bin")])


def _symlinked_folder(root: Path) -> onnx.ModelProto:
    (root / "model" / "sub").symlink_to(root / "outside", target_is_directory=True)
    return _model([_external("sub/secret.bin")])


def _in_if_branch(tensor: TensorProto) -> onnx.ModelProto:
    """y = If(c, then: Identity(x) + w, else: -x), with `w` an initializer of the then branch."""
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_copy"]), helper.make_node("Add", ["x_copy", "w"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
        [tensor],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])],
    )
    return _model(
        [],
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
    )


def _constant_node_in_branch(location: str) -> onnx.ModelProto:
    model = _in_if_branch(_raw((4,), W.tobytes()))
    branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    del branch.initializer[:]
    constant = helper.make_node("Constant", [], ["w"], name="const")
    constant.attribute.add(name="value", type=onnx.AttributeProto.TENSOR).t.CopyFrom(_external(location))
    branch.node.insert(0, constant)
    return model


# Each builds a hostile model (given the layout's root) that must be refused; the message must name the value.
REFUSED: dict[str, Callable[[Path], onnx.ModelProto]] = {
    "absolute_path": lambda root: _model([_external(str(root / "outside" / "secret.bin"))]),
    "dotdot": lambda root: _model([_external("../outside/secret.bin")]),
    "symlinked_file": _symlinked_file,
    "symlinked_folder": _symlinked_folder,
    "nul_in_location": lambda root: _model([_external("w.bin\0../../outside/secret.bin")]),
    "empty_location": lambda root: _model([_external("")]),
    "negative_offset": lambda root: _model([_external("w.bin", offset="-4")]),
    "non_numeric_offset": lambda root: _model([_external("w.bin", offset="zero")]),
    "length_past_end_of_file": lambda root: _model([_external("w.bin", offset="8", length="16")]),
    "length_not_matching_dims": lambda root: _model([_external("w.bin", length="8")]),
    "external_dims_2_pow_40": lambda root: _model([_external("w.bin", dims=(2**40,))]),
    "negative_dims": lambda root: _model([_raw((-4,), W.tobytes())]),
    "inline_dims_2_pow_40": lambda root: _model([_raw((2**40,), W.tobytes())]),
    "inline_data_not_matching_dims": lambda root: _model([_raw((4,), W.tobytes()[:8])]),
    "duplicate_initializer": lambda root: _model(
        [_raw((4,), np.zeros(4, np.float32).tobytes()), _raw((4,), W.tobytes())]
    ),
    "value_produced_twice": lambda root: _model(
        [_raw((4,), W.tobytes(), name="b")],
        [
            helper.make_node("Add", ["x", "b"], ["w"], name="first"),
            helper.make_node("Sub", ["x", "b"], ["w"], name="second"),
            helper.make_node("Add", ["w", "x"], ["y"], name="add"),
        ],
    ),
    "node_output_named_like_an_input": lambda root: _model(
        [_raw((4,), W.tobytes(), name="b")],
        [
            helper.make_node("Add", ["w", "b"], ["w"], name="first"),
            helper.make_node("Add", ["w", "b"], ["y"], name="add"),
        ],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
    ),
    "duplicate_input": lambda root: _model(
        [],
        [helper.make_node("Add", ["w", "w"], ["y"], name="add")],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])] * 2,
    ),
    "escape_inside_if_branch": lambda root: _in_if_branch(_external("../outside/secret.bin")),
    "escape_in_constant_node_of_branch": lambda root: _constant_node_in_branch("../outside/secret.bin"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_model_is_refused_with_one_load_error_naming_the_value(layout, case):
    path = _write(layout / "model", REFUSED[case](layout))

    with pytest.raises(ModelLoadError, match="'w'") as refused:
        load_model(path)

    assert "\n" not in str(refused.value)


def test_absolute_location_error_says_what_is_wrong_and_what_to_do(layout):
    secret = layout / "outside" / "secret.bin"
    path = _write(layout / "model", _model([_external(str(secret))]))

    with pytest.raises(ModelLoadError) as refused:
        load_model(path)

    assert str(refused.value) == (
        f"tensor 'w': external data location '{secret}' is an absolute path; "
        "external data must lie in the model's folder"
    )


def _command(command: str, model: Path, out: Path, good: Path) -> list[str]:
    if command == "optimize":
        return [
            *OPTIMIZE,
            str(model),
            "--passes",
            "cleanup",
            "-o",
            str(out / "o.onnx"),
            "--report",
            str(out / "r.json"),
        ]
    if command == "bench":
        return [*ONNXFORGE, "bench", str(model), "--repeats", "1", "--min-time", "0", "--json", str(out / "b.json")]
    return [*ONNXFORGE, "compare", str(good), str(model), "--samples", "1", "--json", str(out / "c.json")]


# Every case runs through optimize in CI; bench and compare run there for the escapes, and all cases when slow.
_CLI_EVERYWHERE = {"absolute_path", "dotdot", "symlinked_file", "symlinked_folder", "duplicate_initializer"}
CLI_CASES = [
    pytest.param(case, command, marks=() if command == "optimize" or case in _CLI_EVERYWHERE else pytest.mark.slow)
    for case in sorted(REFUSED)
    for command in ("optimize", "bench", "compare")
]


@pytest.mark.parametrize(("case", "command"), CLI_CASES)
def test_hostile_model_through_the_command_is_one_error_line_and_writes_nothing(layout, case, command):
    model = _write(layout / "model", REFUSED[case](layout))
    good = layout / "good.onnx"
    onnx.save(_model([numpy_helper.from_array(W, "w")]), good)
    out = layout / "out"

    done = subprocess.run(_command(command, model, out, good), capture_output=True, text=True, timeout=60, check=False)

    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert len(errors) == 1 and "'w'" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert list(out.iterdir()) == []
    for file in (layout / "model").rglob("*"):
        assert file.is_symlink() or SECRET not in file.read_bytes()


def test_model_with_external_data_inside_an_if_branch_optimizes_and_matches(layout):
    folder = layout / "model"
    model = _in_if_branch(_external("w.bin"))
    path = _write(folder, model)
    out = layout / "out" / "o.onnx"

    done = subprocess.run(
        [*OPTIMIZE, str(path), "--passes", "cleanup", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "identity_nodes_removed=1" in done.stdout, done.stdout
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    for c in (True, False):
        feed = {"c": np.array(c), "x": x}
        expected = x + W if c else -x
        np.testing.assert_array_equal(get_backend("ort").prepare(str(out)).run(feed)["y"], expected)
        np.testing.assert_array_equal(get_backend("ort").prepare(str(path)).run(feed)["y"], expected)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "w.bin"]  # no links or copies left


def test_a_model_file_loaded_once_optimizes_as_its_path_does(layout):
    path = _write(layout / "model", _in_if_branch(_external("w.bin")))
    loaded = ModelFile.load(path)

    by_file, file_report = optimize(loaded, "cleanup", seed=0)
    by_path, path_report = optimize(path, "cleanup", seed=0)

    assert file_report.source == path_report.source == str(path)
    assert file_report.passes[0].status == path_report.passes[0].status == "applied"
    assert by_file.to_proto().SerializeToString() == by_path.to_proto().SerializeToString()
    assert [n.op for n in loaded.model.graph.nodes] == [n.op for n in load_model(path).graph.nodes]  # not modified


@pytest.mark.parametrize("command", ["bench", "compare"])
def test_model_with_external_data_inside_an_if_branch_runs_in_bench_and_compare(layout, command):
    path = _write(layout / "model", _in_if_branch(_external("w.bin")))

    done = subprocess.run(
        _command(command, path, layout / "out", path), capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (layout / "model").iterdir()) == ["model.onnx", "w.bin"]


def test_running_a_model_with_external_data_writes_no_file_and_keeps_locations_relative(layout):
    folder = layout / "model"
    path = _write(folder, _in_if_branch(_external("w.bin")))
    model = load_model(path)

    with model.runtime_source() as source:
        given = onnx.load_from_string(source.model_bytes)
        prepared = get_backend("ort").prepare(source)

    branch = next(a.g for a in given.graph.node[0].attribute if a.name == "then_branch")
    assert [e.value for e in branch.initializer[0].external_data if e.key == "location"] == ["w.bin"]
    assert source.external_folder == folder.resolve()
    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(prepared.run({"c": np.array(True), "x": x})["y"], x + W)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "w.bin"]


def test_weights_past_the_inline_limit_are_handed_to_onnxruntime_in_memory():
    big = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    small = np.arange(64, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("Add", ["h", "small"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")],
    )
    model = load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    source = runtime_source_of(model, inline_limit=big.nbytes)  # as if `big` took the model past 2 GiB
    prepared = get_backend("ort").prepare(source)
    assert list(source.initializers) == ["big"]
    placeholder = next(t for t in onnx.load_from_string(source.model_bytes).graph.initializer if t.name == "big")
    assert not placeholder.raw_data and placeholder.external_data[0].value == IN_MEMORY_LOCATION
    del source, placeholder  # the session keeps what it was given alive
    gc.collect()
    outputs = prepared.run({"x": np.ones((2, 64), np.float32)})

    np.testing.assert_allclose(outputs["y"], np.ones((2, 64), np.float32) @ big + small, rtol=1e-5)


def test_input_with_a_default_value_is_made_constant_and_recorded(tmp_path):
    model = _model(
        [numpy_helper.from_array(W, "w")],
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4]),
        ],
    )

    loaded = load_model(model)
    result, report = optimize(model, "cleanup")

    assert loaded.inputs_made_constant == ["w"]
    assert report.to_dict()["inputs_made_constant"] == ["w"]
    assert "input(s) w had a default value" in report.summary()
    assert loaded.copy().inputs_made_constant == ["w"]
    assert [i.name for i in loaded.graph.inputs] == ["x"]
    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(get_backend("ort").prepare(result).run({"x": x})["y"], x + W)


def test_initializers_listed_as_inputs_in_ir_version_3_are_weights_not_defaults():
    model = _model(
        [numpy_helper.from_array(W, "w")],
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4]),
        ],
    )
    model.ir_version = 3

    assert load_model(model).inputs_made_constant == []


def test_subgraph_input_that_is_also_an_initializer_is_refused():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["acc", "w"], ["acc_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4]),
        ],
        [numpy_helper.from_array(W, "acc"), numpy_helper.from_array(W, "w")],
    )
    model = _model(
        [numpy_helper.from_array(np.array(2, np.int64), "n"), numpy_helper.from_array(np.array(True), "t")],
        [helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body)],
    )

    with pytest.raises(ModelLoadError, match="'acc'"):
        load_model(model)


def test_external_data_in_a_subfolder_of_the_model_folder_loads(layout):
    folder = layout / "model"
    (folder / "weights").mkdir()
    (folder / "weights" / "w.bin").write_bytes(W.tobytes())
    path = folder / "model.onnx"
    path.write_bytes(_model([_external("weights/w.bin", offset="0", length="16")]).SerializeToString())

    model = load_model(path)

    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(get_backend("ort").prepare(model).run({"x": x})["y"], x + W)
    assert model.has_external_data


def test_tvm_loads_weights_from_the_folder_and_from_memory(layout):
    pytest.importorskip("tvm")
    folder = layout / "model"
    path = _write(folder, _model([_external("w.bin")]))
    model = load_model(path)
    x = np.linspace(-1, 1, 4, dtype=np.float32)

    from_folder = get_backend("tvm").prepare(model).run({"x": x})["y"]
    from_memory = get_backend("tvm").prepare(
        runtime_source_of(load_model(_model([numpy_helper.from_array(W, "w")])), 1)
    )

    np.testing.assert_allclose(from_folder, x + W)
    np.testing.assert_allclose(from_memory.run({"x": x})["y"], x + W)
