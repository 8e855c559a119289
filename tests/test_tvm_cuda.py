"""TVM's CUDA target with CUDA graphs (`cuda_graph`, on by default for CUDA compiles): compiled here without
a GPU, the executable captures its static launches in a graph and the artifact's JSON says so; switched off, or
for the CPU, nothing is captured; the setting is refused where it cannot apply. On a machine with a GPU, the captured model gives onnxruntime's outputs on its
first run (the capture) and on a replay with other inputs."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_checks import constant, make_model, value_info
from onnx import helper

from onnxforge.backends import BackendOptions, get_backend
from onnxforge.errors import BackendError

tvm = pytest.importorskip("tvm")

from tvm.s_tir import meta_schedule as ms  # noqa: E402 (needs tvm)

from onnxforge.backends.tvm.backend import cuda_graph_option, relax_module  # noqa: E402
from onnxforge.backends.tvm.targets import resolve_target  # noqa: E402
from onnxforge.backends.tvm.tuning import TuningOptions, extract_tasks, records_use_tensor_cores  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="compiling for CUDA needs nvcc")

CAPTURE = "vm.builtin.cuda_graph.run_or_capture"  # the VM builtin that captures a graph once and replays it
RTOL = 1e-4
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RECORDS = BENCHMARKS / "results" / "tvm-records"  # MetaSchedule records tuned on the lent GPU (docs/tvm.md)
HALF_RECORDS = BENCHMARKS / "results" / "tvm-records-fp16"  # the same, of the residual CNN after the fp16 pass


def _mlp() -> onnx.ModelProto:
    """Four MatMuls with activations between: the middle ones read and write only memory the VM plans statically,
    so they can be captured (the first reads the input, the last writes the output)."""
    rng = np.random.default_rng(0)
    nodes, previous = [], "x"
    for i, activation in enumerate(("Relu", "Tanh", "Sigmoid", None)):
        out = "y" if activation is None else f"m{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out]))
        if activation:
            nodes.append(helper.make_node(activation, [out], [f"a{i}"]))
            previous = f"a{i}"
    weights = [constant(f"w{i}", rng.standard_normal((64, 64)).astype(np.float32) / 8) for i in range(4)]
    return make_model(nodes, [value_info("x", [8, 64])], [value_info("y", [8, 64])], weights)


def _compile(extra: dict[str, str], target: str = "cuda"):
    return get_backend("tvm").compile(_mlp(), BackendOptions(target=target, extra=extra))


@pytest.mark.parametrize("extra", [{}, {"cuda_graph": "true"}], ids=["default", "asked for"])
def test_cuda_graphs_are_compiled_in_and_recorded_in_the_artifact(tmp_path, extra):
    compiled = _compile(extra)
    assert compiled.cuda_graph and CAPTURE in compiled.executable.as_text()
    _, described = compiled.export(tmp_path / "mlp_cuda.so")
    assert json.loads(described.read_text())["cuda_graph"] is True


def test_switched_off_nothing_is_captured(tmp_path):
    compiled = _compile({"cuda_graph": "false"})
    assert not compiled.cuda_graph and CAPTURE not in compiled.executable.as_text()
    _, described = compiled.export(tmp_path / "mlp_cuda.so")
    assert json.loads(described.read_text())["cuda_graph"] is False


def test_cpu_targets_capture_nothing_and_tuned_cuda_compiles_capture_by_default():
    cpu = get_backend("tvm").compile(_mlp(), BackendOptions(target="cpu", threads=1))
    assert not cpu.cuda_graph and CAPTURE not in cpu.executable.as_text()
    assert cuda_graph_option({"tune_trials": "8"}, resolve_target("cuda"))


@pytest.mark.parametrize(
    ("extra", "target", "message"),
    [
        ({"cuda_graph": "yes"}, "cuda", "takes true or false"),
        ({"cuda_graph": "true"}, "cpu", "setting of CUDA targets"),
    ],
    ids=["bad value", "cpu target"],
)
def test_the_setting_is_refused_where_it_cannot_apply(extra, target, message):
    with pytest.raises(BackendError, match=message):
        _compile(extra, target)


@pytest.mark.skipif(not tvm.cuda(0).exist, reason="needs a CUDA GPU")
def test_a_captured_model_replays_with_new_inputs():
    prepared = _compile({"cuda_graph": "true"}).load()
    ort = get_backend("ort").prepare(_mlp())
    for seed in (0, 1):  # the first run captures, the second replays the graph on other inputs
        inputs = {"x": np.random.default_rng(seed).standard_normal((8, 64)).astype(np.float32)}
        expected, actual = ort.run(inputs)["y"], prepared.run(inputs)["y"]
        assert float(np.abs(actual - expected).max()) / float(np.abs(expected).max()) < RTOL


@pytest.fixture(scope="module")
def encoder() -> onnx.ModelProto:
    """One layer of the transformer encoder of benchmarks/torch_models.py at 1x128x256, the model the records were
    tuned on: its six layers are alike, so one has all 16 of its tasks and compiles in a quarter of the time."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(BENCHMARKS))
    from torch_models import transformer_encoder_module

    from onnxforge.frontends.torch import from_torch

    example = torch.randn(1, 128, 256)
    module = transformer_encoder_module(layers=1)
    return from_torch(module, example, input_names=["x"], output_names=["y"]).to_proto()


def _kernels(compiled) -> dict[str, str]:
    """The CUDA source of each kernel of a compiled model, by kernel name."""
    modules, sources = [compiled.executable.mod], []
    while modules:
        module = modules.pop()
        modules.extend(module.imports)
        if module.kind == "cuda":
            sources.append(module.inspect_source())
    parts = [part for source in sources for part in source.split('extern "C" __global__ ')[1:]]
    return {re.match(r"void (?:__launch_bounds__\(\d+\) )?(\w+)\(", part)[1]: part for part in parts}


def test_records_tuned_on_the_gpu_are_applied_to_the_encoder(encoder):
    target = resolve_target("cuda")
    folder = TuningOptions(0, RECORDS).records_folder(target.target)
    database = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
    tasks = extract_tasks(relax_module(encoder), target.target)
    tuned_tasks = [task.task_name for task in tasks if database.has_workload(task.dispatched[0])]
    assert len(tasks) == 16 and len(tuned_tasks) >= 15  # the six layers' 16 tasks; the records hold all but a transpose
    assert "fused_matmul5_add7_add5" in tuned_tasks  # the feed-forward down projection, 38% of the GPU time

    backend = get_backend("tvm")
    tuned = backend.compile(encoder, BackendOptions(target="cuda", extra={"tune_records": str(RECORDS)}))
    untuned = backend.compile(encoder, BackendOptions(target="cuda"))
    assert tuned.cuda_graph and CAPTURE in tuned.executable.as_text()
    with_records, without = _kernels(tuned), _kernels(untuned)
    assert with_records.keys() == without.keys()
    changed = {name for name in with_records if with_records[name] != without[name]}
    # Only tuned tasks' kernels change, the projections' all do; a small task's best schedule may be dlight's own.
    assert changed <= {f"{name}_kernel" for name in tuned_tasks}
    assert {f"{name}_kernel" for name in tuned_tasks if "matmul" in name and "add" in name} <= changed


def test_records_of_a_half_precision_model_are_told_by_their_tensor_core_intrinsics(tmp_path):
    """Such records can only be read once CUDA's tensor intrinsics are registered (31 s here), which a float32
    compile otherwise skips: a records folder shared by both must be recognised before it is read."""
    folder = TuningOptions(0, RECORDS).records_folder(resolve_target("cuda").target).name
    assert records_use_tensor_cores(HALF_RECORDS / folder)
    assert not records_use_tensor_cores(RECORDS / folder)  # the float32 encoder's
    assert not records_use_tensor_cores(tmp_path)  # no records at all
