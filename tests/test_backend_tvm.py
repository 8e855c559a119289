"""The TVM backend: models exported from PyTorch, and the outputs of `fuse` and int8 `quant`, compiled for the CPU
and run on TVM's VM, give onnxruntime's outputs; what TVM cannot take is one clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from graph_checks import constant, make_model, value_info
from model_builders import BertLike, ResidualCNN
from onnx import helper

from onnxforge import optimize
from onnxforge.backends import BackendOptions, get_backend
from onnxforge.data import random_inputs
from onnxforge.errors import BackendError
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import load_model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import MeasureOptions

tvm = pytest.importorskip("tvm")

import onnxforge.backends.tvm  # noqa: E402 (needs tvm)
from onnxforge.backends.tvm.targets import resolve_target  # noqa: E402

RTOL = 1e-4  # TVM and onnxruntime sum in different orders: float32 rounding only


def _cnn() -> onnx.ModelProto:
    torch.manual_seed(0)
    return from_torch(ResidualCNN().eval(), torch.randn(1, 3, 16, 16)).to_proto()


def _encoder() -> onnx.ModelProto:
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 32, (1, 16)), torch.ones(1, 16, dtype=torch.int64)
    return from_torch(BertLike().eval(), (ids, mask), input_names=["input_ids", "attention_mask"]).to_proto()


def _agree(model) -> None:
    """TVM's outputs equal onnxruntime's on two random inputs."""
    proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
    ort, tvm = get_backend("ort").prepare(proto), get_backend("tvm").prepare(proto, BackendOptions(threads=2))
    for seed in (0, 1):
        inputs = random_inputs(skeleton_proto(load_model(proto)), seed=seed)
        expected, actual = ort.run(inputs), tvm.run(inputs)
        assert list(actual) == list(expected)
        for name, value in expected.items():
            scale = max(float(np.abs(value).max()), 1e-6)
            assert float(np.abs(actual[name] - value).max()) / scale < RTOL, name


@pytest.mark.parametrize("build", [_cnn, _encoder], ids=["cnn", "encoder"])
def test_models_exported_from_pytorch_run_on_tvm_as_on_onnxruntime(build):
    _agree(build())


@pytest.mark.parametrize("build", [_cnn, _encoder], ids=["cnn", "encoder"])
def test_fused_models_for_tvm_keep_to_standard_ops_and_run(build):
    # Unverified, so that a rewrite TVM runs wrongly is not rolled back but fails the check against onnxruntime
    # below (and the model is compiled once, not at every step).
    model, _ = optimize(build(), "cleanup,fuse", backend="tvm", seed=0, verify=False)
    assert all((node.domain or "") in ("", "ai.onnx") for node in model.graph.nodes)
    _agree(model)


def test_static_int8_qdq_models_run_on_tvm():
    source = _cnn()
    samples = [random_inputs(skeleton_proto(load_model(source)), seed=s) for s in range(4)]
    model, _ = optimize(source, "cleanup,quant:mode=static:format=qdq:measure=false", data=samples, seed=0)
    assert any(node.op == "QuantizeLinear" for node in model.graph.nodes)
    proto = model.to_proto()
    inputs = samples[0]
    expected = get_backend("ort").prepare(proto).run(inputs)
    actual = get_backend("tvm").prepare(proto).run(inputs)
    for name, value in expected.items():  # integer kernels round differently: within a few quantization steps
        assert np.abs(actual[name] - value).max() < 0.05 * np.abs(value).max(), name


def test_ops_tvm_cannot_import_are_named_in_one_error():
    model = make_model(
        [helper.make_node("FusedMatMul", ["x", "b"], ["y"], domain="com.microsoft")],
        [value_info("x", [2, 4])],
        [value_info("y", [2, 4])],
        [constant("b", np.zeros((4, 4), np.float32))],
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(BackendError, match="does not support: com.microsoft.FusedMatMul$"):
        get_backend("tvm").prepare(model)


def test_scalar_inputs_and_shape_outputs_round_trip():
    model = make_model(
        [helper.make_node("Mul", ["x", "s"], ["y"]), helper.make_node("Shape", ["x"], ["shape"])],
        [value_info("x", [2, 3]), value_info("s", [])],
        [value_info("y", [2, 3]), value_info("shape", [2], onnx.TensorProto.INT64)],
    )
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(2.0, np.float32)}
    outputs = get_backend("tvm").prepare(model).run(inputs)
    np.testing.assert_array_equal(outputs["y"], inputs["x"] * 2)
    np.testing.assert_array_equal(outputs["shape"], [2, 3])


def test_dynamic_shapes_are_refused_with_each_input_and_its_dynamic_dims_named():
    model = make_model(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        [value_info("x", ["batch", 4]), value_info("z", [None, 4])],
        [value_info("y", ["batch", 4])],
    )
    with pytest.raises(BackendError, match=r"pass --shape x=<batch>x4 --shape z=<\?>x4 with a number for each"):
        get_backend("tvm").prepare(model)


def test_measure_gives_the_same_statistics_as_onnxruntime_and_checks_the_feed_first():
    proto = _cnn()
    prepared = get_backend("tvm").prepare(proto)
    inputs = random_inputs(skeleton_proto(load_model(proto)), seed=0)
    stats = prepared.measure(inputs, MeasureOptions(warmup=2, min_repeats=5, min_time_s=0.0))
    assert stats.repeats >= 5 and stats.warmup == 2 and 0 < stats.min_ms <= stats.median_ms <= stats.max_ms
    with pytest.raises(BackendError, match="without input"):
        prepared.measure({}, MeasureOptions(warmup=0, min_repeats=1, min_time_s=0.0))


def test_targets_by_name_and_unknown_ones_refused():
    cuda = resolve_target("cuda:sm_80")
    assert (cuda.device, cuda.target.kind.name, cuda.target.attrs["arch"]) == ("cuda", "cuda", "sm_80")
    arm = resolve_target("aarch64")
    assert arm.machine == "aarch64" and "aarch64" in str(arm.target.attrs["mtriple"])
    assert resolve_target("cpu", threads=1).target.attrs["num-cores"] == 1
    for wrong, message in (("tpu", "has no target 'tpu'"), ("cuda:ampere", "write it like cuda:sm_90")):
        with pytest.raises(BackendError, match=message):
            resolve_target(wrong)


def test_cuda_compiles_here_without_a_gpu_and_loading_it_here_is_one_error(tmp_path):
    compiled = get_backend("tvm").compile(_cnn(), BackendOptions(target="cuda"))
    library, described = compiled.export(tmp_path / "cnn_cuda.so")
    meta = json.loads(described.read_text())
    assert library.stat().st_size > 0 and meta["device"] == "cuda" and '"arch":"sm_90"' in meta["target"]
    assert [i["shape"] for i in meta["inputs"]] == [[1, 3, 16, 16]] and meta["inputs"][0]["dtype"] == "float32"
    if not tvm.cuda(0).exist:
        with pytest.raises(BackendError, match="no CUDA GPU"):
            compiled.load()


def test_exported_cpu_artifact_runs_with_the_tvm_runtime_alone(tmp_path):
    """The loader, run with a copy of TVM that has no compiler library, gives the compiled model's outputs."""
    proto = _cnn()
    compiled = get_backend("tvm").compile(proto, BackendOptions(threads=1))
    library, _ = compiled.export(tmp_path / "cnn.so")
    runtime_only = tmp_path / "site"
    package = Path(tvm.__file__).parent
    shutil.copytree(package, runtime_only / "tvm", ignore=shutil.ignore_patterns(
        "libtvm_compiler.so", "3rdparty", "src", "include", "__pycache__"))
    inputs = random_inputs(skeleton_proto(load_model(proto)), seed=3)
    np.savez(tmp_path / "in.npz", **inputs)
    loader = Path(onnxforge.backends.tvm.__file__).parent / "loader.py"
    # One process (each start imports TVM): it checks that the TVM it imports is the copy, then runs the loader.
    script = ("import runpy, sys, tvm; assert tvm.__file__.startswith(sys.argv[1]), tvm.__file__; "
              "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    command = [sys.executable, "-c", script, str(runtime_only), str(loader), str(library),
               "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz"), "--repeat", "3"]
    environment = {**os.environ, "PYTHONPATH": str(runtime_only)}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "median" in result.stdout
    expected = compiled.load().run(inputs)
    actual = dict(np.load(tmp_path / "out.npz"))
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value)


def test_an_artifact_that_cannot_be_written_leaves_no_file(tmp_path):
    compiled = get_backend("tvm").compile(_cnn())
    with pytest.raises(BackendError, match="must be a .so"):
        compiled.export(tmp_path / "cnn.bin")
    assert not list(tmp_path.iterdir())
