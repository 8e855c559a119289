"""MetaSchedule tuning for the TVM backend: a tiny budget writes records, the tuned model gives onnxruntime's
outputs, and a second run with the same or a smaller budget reuses the records and measures nothing."""

from __future__ import annotations

import json
import platform
import shutil
import tarfile
import threading
import time

import numpy as np
import psutil
import pytest
from graph_checks import constant, make_model, value_info
from onnx import helper

from onnxforge.backends import get_backend
from onnxforge.errors import BackendError

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from onnxforge.backends.tvm.targets import resolve_target  # noqa: E402
from onnxforge.backends.tvm.tuning import TuningOptions, compile_tuned  # noqa: E402

RTOL = 1e-4  # TVM and onnxruntime sum in different orders: float32 rounding only
TRIALS = 2  # one task (MatMul + Add + Relu fuse into one function): one batch of 2 trials, each built and timed


def _dense_relu():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    weights = [constant("w", rng.standard_normal((64, 64)).astype(np.float32)),
               constant("b", rng.standard_normal(64).astype(np.float32))]
    return make_model(nodes, [value_info("x", [1, 64])], [value_info("y", [1, 64])], weights)


def _relax_module(proto) -> tvm.IRModule:
    return relax.transform.DecomposeOpsForInference()(from_onnx(proto, keep_params_in_input=False))


def _cpu():
    return resolve_target("cpu", 2).target


def _compile(records, trials: int, target=None):
    """compile_tuned on the tiny model; its executable and the progress lines it printed."""
    lines: list[str] = []
    executable = compile_tuned(_relax_module(_dense_relu()), target or _cpu(), TuningOptions(trials, records),
                               lines.append)
    return executable, lines


def _measured(folder) -> int:
    """How many trials MetaSchedule's database holds (one line per measured candidate)."""
    return len((folder / "database_tuning_record.json").read_text().splitlines())


def _assert_runs_as_on_onnxruntime(executable) -> None:
    proto = _dense_relu()
    ort = get_backend("ort").prepare(proto)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for seed in (0, 1):
        x = np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32)
        expected, actual = ort.run({"x": x})["y"], vm["main"](tvm.runtime.tensor(x)).numpy()
        scale = max(float(np.abs(expected).max()), 1e-6)
        assert float(np.abs(actual - expected).max()) / scale < RTOL


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny tuning run into fresh records, shared by the tests: (records, executable, progress lines, the
    worker processes it started that are still alive 10 s after it; other tests' processes do not count)."""
    records = tmp_path_factory.mktemp("records")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    executable, lines = _compile(records, TRIALS)
    started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    _, alive = psutil.wait_procs(started, timeout=10)
    return records, executable, lines, alive


def test_tiny_budget_tunes_the_task_and_writes_records(tuned):
    records, _, lines, alive = tuned
    folder = TuningOptions(TRIALS, records).records_folder(_cpu())
    assert lines[0].startswith(f"tuning 1 tasks, {TRIALS} trials")
    assert any(line.startswith(f"task 1/1 fused_matmul_add_relu: {TRIALS} trials") for line in lines), lines
    assert _measured(folder) == TRIALS
    assert list(json.loads((folder / "trials.json").read_text())["trials"].values()) == [TRIALS]
    assert not alive  # no builder or runner worker outlives the tuning


def test_tuned_model_runs_as_on_onnxruntime(tuned):
    _assert_runs_as_on_onnxruntime(tuned[1])


@pytest.mark.parametrize("trials", [TRIALS, TRIALS - 1], ids=["same-budget", "smaller-budget"])
def test_second_run_reuses_the_records_and_measures_nothing(tuned, trials):
    records = tuned[0]
    folder = TuningOptions(trials, records).records_folder(_cpu())
    before = _measured(folder)
    executable, lines = _compile(records, trials)
    assert lines == ["reused records for 1 of 1 tasks"]
    assert _measured(folder) == before
    _assert_runs_as_on_onnxruntime(executable)


def test_larger_budget_tunes_the_task_further(tuned, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(tuned[0], records)
    folder = TuningOptions(TRIALS + 1, records).records_folder(_cpu())
    _, lines = _compile(records, TRIALS + 1)
    assert lines[0].startswith(f"tuning 1 tasks, {TRIALS + 1} trials")
    assert _measured(folder) == TRIALS + TRIALS + 1
    assert list(json.loads((folder / "trials.json").read_text())["trials"].values()) == [TRIALS + 1]


@pytest.mark.parametrize("trials", [-5, 2.5, "8"])
def test_trials_must_be_a_whole_number(trials):
    with pytest.raises(BackendError, match="tuning trials must be") as error:
        TuningOptions(trials)
    assert "\n" not in str(error.value)


def test_no_trials_applies_the_records_kept(tuned):
    records = tuned[0]
    folder = TuningOptions(0, records).records_folder(_cpu())
    before = _measured(folder)
    executable, lines = _compile(records, 0)
    assert lines == [] and _measured(folder) == before
    _assert_runs_as_on_onnxruntime(executable)


def test_no_trials_and_no_records_is_one_clear_error(tmp_path):
    with pytest.raises(BackendError, match="no tuning records for llvm") as error:
        _compile(tmp_path, 0)
    assert "\n" not in str(error.value)


def test_records_are_kept_per_target_under_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXFORGE_CACHE", str(tmp_path))
    two, one = (TuningOptions(8).records_folder(resolve_target("cpu", n).target) for n in (2, 1))
    assert two.parent == one.parent == tmp_path / "tvm-tuning"
    assert two != one and two.name.startswith("llvm-")
    monkeypatch.delenv("ONNXFORGE_CACHE")
    assert TuningOptions(8).records_folder(_cpu()).parent == tmp_path.home() / ".cache/onnxforge/tvm-tuning"
    assert TuningOptions(8, tmp_path / "mine").records_folder(_cpu()).parent == tmp_path / "mine"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="needs a machine that cannot run AArch64 code")
def test_tuning_for_a_cpu_that_cannot_run_here_is_one_clear_error(tmp_path):
    with pytest.raises(BackendError, match="cannot tune aarch64 code on this x86_64 machine") as error:
        _compile(tmp_path, TRIALS, target=resolve_target("aarch64", 2).target)
    assert "\n" not in str(error.value)
    assert all(_measured(path.parent) == 0 for path in tmp_path.rglob("database_tuning_record.json"))


def test_cuda_rounds_are_written_for_the_gpu_machine_and_its_times_reach_the_database(tmp_path):
    """Tuning for CUDA without a GPU, measured by rounds: the test plays the GPU machine's part (it writes the
    round's results file, as measure_candidates.py does there, with times of its own choosing) and checks that
    the candidates it was handed are the task's, and that the times it gave are what the database keeps."""
    if shutil.which("nvcc") is None:
        pytest.skip("compiling for CUDA needs nvcc")
    target, rounds = resolve_target("cuda").target, tmp_path / "rounds"
    options = TuningOptions(TRIALS, tmp_path / "records", rounds=rounds)
    tuning = threading.Thread(target=compile_tuned, args=(_relax_module(_dense_relu()), target, options))
    tuning.start()
    manifest = rounds / "round-001" / "round.json"
    while not manifest.exists() and tuning.is_alive():
        time.sleep(1)
    candidates = json.loads(manifest.read_text())["candidates"]
    assert len(candidates) == TRIALS and json.loads(manifest.read_text())["arch"] == "sm_90"
    with tarfile.open(rounds / "round-001.tar.xz") as archive:  # what travels to the GPU machine
        assert {f"round-001/{c['library']}" for c in candidates} < set(archive.getnames())
    assert all((manifest.parent / c["library"]).stat().st_size > 0 for c in candidates)
    assert {json.dumps(c["args"]) for c in candidates} == {
        json.dumps([["float32", [1, 64]], ["float32", [64, 64]], ["float32", [64]], ["float32", [1, 64]]])}
    times = {c["id"]: [1e-5 * (i + 1)] * 3 for i, c in enumerate(candidates)}
    results = {"round": 1, "candidates": {ident: {"run_secs": secs} for ident, secs in times.items()}}
    (manifest.parent / "results.json").write_text(json.dumps(results))
    tuning.join(timeout=300)
    folder = options.records_folder(target)
    kept = [json.loads(line)[1][1] for line in (folder / "database_tuning_record.json").read_text().splitlines()]
    assert sorted(kept) == sorted(times.values())
    assert list(json.loads((folder / "trials.json").read_text())["trials"].values()) == [TRIALS]
