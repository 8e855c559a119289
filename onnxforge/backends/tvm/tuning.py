"""MetaSchedule tuning for the TVM backend, with a records database that later runs reuse.

The records of a target live in one folder, `<records>/<kind>-<hash of the target>/`: MetaSchedule's JSON database
(`database_workload.json`, `database_tuning_record.json`, keyed by the structural hash of each task's TIR), our
`trials.json` (the trial budget of the last run that tuned each task) and `tuning.log` (MetaSchedule's log of the
last tuning run). A task is tuned only when no run with at least the requested budget has tuned it yet, so running
the same model again, or another model that shares its fused operators, measures nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from onnxforge.backends.tvm.errors import one_line
from onnxforge.errors import BackendError

try:
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
except ImportError as exc:
    raise ModuleNotFoundError(f"apache-tvm (pip install 'onnxforge[tvm]'): {exc}") from exc

Progress = Callable[[str], None]

_TENSOR_INTRIN = "tvm.s_tir.tensor_intrin"
_CPU_INTRINSICS = {"x86_64": "x86", "aarch64": "arm_cpu", "riscv64": "riscv_cpu"}  # modules of tvm.s_tir.tensor_intrin


@dataclass(frozen=True)
class TuningOptions:
    """How long to tune, and where the records are kept.

    `trials` is the measurement budget of one tuning run of a model, shared evenly by its tasks (its fused
    operators). `records` is the database folder; by default `$ONNXFORGE_CACHE/tvm-tuning`, else
    `~/.cache/onnxforge/tvm-tuning`.
    """

    trials: int
    records: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise BackendError(f"tuning trials must be a whole number of 1 or more, got {self.trials!r}")

    def records_folder(self, target: tvm.target.Target) -> Path:
        """The folder holding the records of `target` (its string, CPU and core count included, is the key)."""
        if self.records is not None:
            root = Path(self.records).expanduser()
        elif os.environ.get("ONNXFORGE_CACHE"):
            root = Path(os.environ["ONNXFORGE_CACHE"]).expanduser() / "tvm-tuning"
        else:
            root = Path.home() / ".cache" / "onnxforge" / "tvm-tuning"
        digest = hashlib.sha256(str(target).encode()).hexdigest()[:12]
        return root / f"{target.kind.name}-{digest}"


def compile_tuned(
    module: tvm.IRModule,
    target: tvm.target.Target,
    options: TuningOptions,
    progress: Progress | None = None,
) -> relax.VMExecutable:
    """Compile a Relax module for `target` with tuned schedules: tune the tasks that the records do not cover yet,
    then build with the best record of each task and TVM's default schedule for any task without one.

    `progress` receives short lines about what is reused and tuned. BackendError when TVM fails.
    """
    say = progress or (lambda line: None)
    folder = options.records_folder(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _tensor_intrinsics(target):
            tasks = _extract_tasks(module, target)
            database = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
            tuned = _read_trials(folder)
            pending = [task for task in tasks if tuned.get(_workload_key(task), 0) < options.trials
                       or not database.has_workload(task.dispatched[0])]
            if len(pending) < len(tasks):
                say(f"reused records for {len(tasks) - len(pending)} of {len(tasks)} tasks")
            if pending:
                _check_measurable(target, folder)
                succeeded = _tune(pending, target, database, options.trials // len(tasks) or 1, folder, say)
                _write_trials(folder, {_workload_key(task): options.trials for task in succeeded})
            return ms.relax_integration.compile_relax(database, module, target, params=None)
    except BackendError:
        raise
    except Exception as exc:  # TVM raises its own error types (TVMError, InternalError, ...)
        raise BackendError(f"TVM tuning failed: {one_line(exc)} (log: {folder / 'tuning.log'})") from exc


def _extract_tasks(module: tvm.IRModule, target: tvm.target.Target) -> list[ms.ExtractedTask]:
    """The fused TIR functions of `module`, fused by the same passes that `compile_relax` runs, so that the
    workloads match the database's keys."""
    passes = relax.pipeline.library_dispatch_passes(target) + relax.pipeline.legalize_passes(target)
    with target:
        fused = tvm.transform.Sequential(passes)(module)
    return ms.relax_integration.extract_tasks(fused, target)


def _tune(
    tasks: list[ms.ExtractedTask],
    target: tvm.target.Target,
    database: ms.Database,
    trials_per_task: int,
    folder: Path,
    say: Progress,
) -> list[ms.ExtractedTask]:
    """Tune `tasks` into `database`; return those with at least one successful measurement."""
    cores = int(target.attrs.get("num-cores", 0)) or os.cpu_count() or 1
    budget = trials_per_task * len(tasks)
    log = folder / "tuning.log"
    say(f"tuning {len(tasks)} tasks, {budget} trials (log: {log})")
    contexts = [
        ms.TuneContext(task.dispatched[0], target=target, space_generator="post-order-apply",
                       search_strategy="evolutionary", task_name=task.task_name, num_threads=cores).clone()
        for task in tasks
    ]
    counter = _TrialCounter([task.task_name for task in tasks], say)
    # Builder workers are fresh processes for every batch: let them register only this CPU's intrinsics too.
    load_intrinsics = functools.partial(_load_tensor_intrinsics, _cpu_intrinsics(target))
    builder = ms.builder.LocalBuilder(max_workers=cores, initializer=load_intrinsics)
    runner = ms.runner.LocalRunner()
    start = time.perf_counter()
    try:
        with _meta_schedule_log(log):
            ms.tune_tasks(
                tasks=contexts,
                task_weights=[float(task.weight) for task in tasks],
                work_dir=str(folder),
                max_trials_global=budget,
                num_trials_per_iter=min(64, trials_per_task),
                builder=builder,
                runner=runner,
                database=database,
                measure_callbacks=[*ms.MeasureCallback.create("default"), counter],
            )
    finally:
        runner.pool.shutdown()  # its worker process would otherwise outlive the tuning
    say(f"tuned {len(tasks)} tasks in {time.perf_counter() - start:.0f} s")
    return [task for task, succeeded in zip(tasks, counter.succeeded) if succeeded]


@derived_object
class _TrialCounter(ms.measure_callback.PyMeasureCallback):
    """Reports each measured batch through `progress`, and counts the successful trials of every task."""

    def __init__(self, names: list[str], say: Progress) -> None:
        self.names, self.say = names, say
        self.trials, self.succeeded = [0] * len(names), [0] * len(names)

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        if not measure_candidates:  # a task whose design space is used up
            return
        failed = sum(1 for built, ran in zip(builder_results, runner_results) if built.error_msg or ran.error_msg)
        self.trials[task_id] += len(measure_candidates)
        self.succeeded[task_id] += len(measure_candidates) - failed
        failures = f", {failed} failed" if failed else ""
        name, trials = self.names[task_id], self.trials[task_id]
        self.say(f"task {task_id + 1}/{len(self.names)} {name}: {trials} trials{failures}")


def _workload_key(task: ms.ExtractedTask) -> str:
    """The key of the task's workload in MetaSchedule's database (module equality "structural")."""
    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def _read_trials(folder: Path) -> dict[str, int]:
    path = folder / "trials.json"
    return json.loads(path.read_text())["trials"] if path.exists() else {}


def _write_trials(folder: Path, tuned: dict[str, int]) -> None:
    """Record the budget that tuned each task; re-read first, so that another run's records since are kept."""
    trials = _read_trials(folder)
    trials.update({key: max(budget, trials.get(key, 0)) for key, budget in tuned.items()})
    temporary = folder / f"trials.json.{os.getpid()}"
    temporary.write_text(json.dumps({"trials": trials}, indent=1, sort_keys=True))
    os.replace(temporary, folder / "trials.json")


@contextmanager
def _meta_schedule_log(path: Path) -> Iterator[None]:
    """Send MetaSchedule's log (task tables, every trial, build and run errors) to `path`, not to the console."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.level, logger.propagate = saved


@contextmanager
def _tensor_intrinsics(target: tvm.target.Target) -> Iterator[None]:
    """Make MetaSchedule's `import tvm.s_tir.tensor_intrin` register only the tensor intrinsics of the target's CPU.

    The full package parses the TVMScript of every GPU's intrinsics too, in this process and in every builder
    worker, where that can outlast the builder's timeout on a small machine (docs/tvm.md). The stand-in package
    is taken out again afterwards, so that a later full import (for a GPU target) still registers everything.
    """
    module = _cpu_intrinsics(target)
    stand_in = module is not None and _TENSOR_INTRIN not in sys.modules
    _load_tensor_intrinsics(module)
    try:
        yield
    finally:
        if stand_in:
            del sys.modules[_TENSOR_INTRIN]


def _load_tensor_intrinsics(module: str | None) -> None:
    """Register the tensor intrinsics of one module of tvm.s_tir.tensor_intrin, or all of them (None)."""
    if module is not None and _TENSOR_INTRIN not in sys.modules:
        package = types.ModuleType(_TENSOR_INTRIN)  # an empty stand-in: importing a submodule skips the others
        package.__path__ = list(importlib.util.find_spec(_TENSOR_INTRIN).submodule_search_locations)
        sys.modules[_TENSOR_INTRIN] = package
    importlib.import_module(_TENSOR_INTRIN if module is None else f"{_TENSOR_INTRIN}.{module}")


def _cpu_intrinsics(target: tvm.target.Target) -> str | None:
    """The module of tvm.s_tir.tensor_intrin for the target's CPU; None for other targets and unknown CPUs."""
    return _CPU_INTRINSICS.get(_cpu_arch(target) or "")


def _check_measurable(target: tvm.target.Target, folder: Path) -> None:
    """BackendError for a target whose code cannot run here: MetaSchedule measures every trial on this machine."""
    arch, here = _cpu_arch(target), tvm.target.codegen.llvm_get_system_triple().split("-")[0]
    if arch is not None and arch != here:
        what = f"{arch} code"
    elif target.kind.name == "cuda" and not tvm.cuda(0).exist:
        what = "CUDA code without a GPU"
    else:
        return
    raise BackendError(
        f"cannot tune {what} on this {here} machine, where MetaSchedule measures; tune on a machine that runs it "
        f"and copy its records folder {folder.name} into {folder.parent}, or compile without tuning"
    )


def _cpu_arch(target: tvm.target.Target) -> str | None:
    """The CPU architecture an LLVM target compiles for (x86_64, aarch64, ...); None for other kinds of target."""
    if target.kind.name != "llvm":
        return None
    return (str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()).split("-")[0]
