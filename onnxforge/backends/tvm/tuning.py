"""MetaSchedule tuning for the TVM backend, with a records database that later runs reuse.

The records of a target live in one folder, `<records>/<kind>-<hash of the target>/`: MetaSchedule's JSON database
(`database_workload.json`, `database_tuning_record.json`, keyed by the structural hash of each task's TIR), our
`trials.json` (the trial budget of the last run that tuned each task) and `tuning.log` (MetaSchedule's log of the
last tuning run). A task is tuned only when no run with at least the requested budget has tuned it yet, so running
the same model again, or another model that shares its fused operators, measures nothing. A budget of 0 trials
tunes nothing and compiles with the records kept.

MetaSchedule measures on this machine, except for CUDA targets given a rounds folder: then `RoundRunner` hands
each round of candidates to the GPU machine (docs/tvm.md).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
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
    operators); 0 tunes nothing and applies the records kept. `records` is the database folder; by default
    `$ONNXFORGE_CACHE/tvm-tuning`, else `~/.cache/onnxforge/tvm-tuning`. `rounds` (CUDA targets): measure on
    another machine, one round of candidates at a time, through this folder (`RoundRunner`). `only`: tune only
    the tasks whose name contains one of these strings; the others keep TVM's default schedules. `batch`: the
    candidates of a task measured together (a round holds one batch of every task).
    """

    trials: int
    records: Path | None = None
    rounds: Path | None = None
    only: tuple[str, ...] = ()
    batch: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 0:
            raise BackendError(f"tuning trials must be a whole number of 0 or more, got {self.trials!r}")

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
    cuda_graph: bool = False,
) -> relax.VMExecutable:
    """Compile a Relax module for `target` with tuned schedules: tune the tasks that the records do not cover yet,
    then build with the best record of each task and TVM's default schedule for any task without one.

    `progress` receives short lines about what is reused and tuned; `cuda_graph` captures the static launches of
    a CUDA target in a graph. BackendError when TVM fails, or when 0 trials are asked and no records exist.
    """
    say = progress or (lambda line: None)
    folder = options.records_folder(target)
    if options.trials == 0 and not (folder / "database_workload.json").exists():
        raise BackendError(f"no tuning records for {target.kind.name} in {folder}; tune with some trials first")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _tensor_intrinsics(target, _needs_half_intrinsics(target, module, folder)):
            database = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
            if options.trials:
                _tune_pending(module, target, options, database, folder, say)
            return _compile_with_database(database, module, target, cuda_graph)
    except BackendError:
        raise
    except Exception as exc:  # TVM raises its own error types (TVMError, InternalError, ...)
        raise BackendError(f"TVM tuning failed: {one_line(exc)} (log: {folder / 'tuning.log'})") from exc


def _tune_pending(
    module: tvm.IRModule,
    target: tvm.target.Target,
    options: TuningOptions,
    database: ms.Database,
    folder: Path,
    say: Progress,
) -> None:
    """Tune the tasks of `module` (those `options.only` names) that no run with the budget has tuned yet."""
    tasks = [task for task in extract_tasks(module, target)
             if not options.only or any(name in task.task_name for name in options.only)]
    tuned = _read_trials(folder)
    pending = [task for task in tasks if tuned.get(_workload_key(task), 0) < options.trials
               or not database.has_workload(task.dispatched[0])]
    if len(pending) < len(tasks):
        say(f"reused records for {len(tasks) - len(pending)} of {len(tasks)} tasks")
    if not pending:
        return
    if options.rounds is None:
        _check_measurable(target, folder)
    succeeded = _tune(pending, target, database, options.trials // len(tasks) or 1, folder, say, options)
    _write_trials(folder, {_workload_key(task): options.trials for task in succeeded})


def _compile_with_database(
    database: ms.Database, module: tvm.IRModule, target: tvm.target.Target, cuda_graph: bool
) -> relax.VMExecutable:
    """MetaSchedule's `compile_relax`; with `cuda_graph` (a CUDA target), its pipeline (fuse as task extraction
    does, apply the database, dlight's default schedules for the rest) with CUDA's own finalization passes, in a
    pass context that keeps the CUDA graph switch: `compile_relax` drops the switch and, not finding CUDA's
    passes through `relax.pipeline` in this TVM, finalizes without RewriteCUDAGraph."""
    if not cuda_graph:
        return ms.relax_integration.compile_relax(database, module, target, params=None)
    from tvm.relax.backend.cuda import pipeline as cuda  # relax.pipeline does not reach these two of CUDA's lists
    from tvm.s_tir import dlight

    config = {"relax.backend.use_cuda_graph": True}  # read by RewriteCUDAGraph, a finalization pass
    with target, database, tvm.transform.PassContext(opt_level=3, config=config):
        passes = [
            *_fuse_passes(target),
            relax.transform.MetaScheduleApplyDatabase(),  # made in the target's context, which it reads
            dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                        dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()),
            *cuda.dataflow_lower_passes(target),
            *cuda.finalize_passes(target),  # RewriteCUDAGraph among them
        ]
        return relax.build(module, target=target, relax_pipeline=tvm.transform.Sequential(passes))


def extract_tasks(module: tvm.IRModule, target: tvm.target.Target) -> list[ms.ExtractedTask]:
    """The fused TIR functions of `module`, unscheduled and fused by the passes that the compile with the
    database runs, so that the workloads match the database's keys."""
    with target:
        fused = tvm.transform.Sequential(_fuse_passes(target))(module)
    return ms.relax_integration.extract_tasks(fused, target)


def _fuse_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Library dispatch, legalization and fusion into TIR functions, as MetaSchedule's `compile_relax` runs them
    (the CUDA pipeline's own legalization also schedules the functions with dlight, too early for a database)."""
    return [
        *relax.pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def _tune(
    tasks: list[ms.ExtractedTask],
    target: tvm.target.Target,
    database: ms.Database,
    trials_per_task: int,
    folder: Path,
    say: Progress,
    options: TuningOptions,
) -> list[ms.ExtractedTask]:
    """Tune `tasks` into `database`, measuring here or, given `options.rounds`, round by round on another
    machine; return the tasks with at least one successful measurement."""
    rounds = options.rounds
    cores = int(target.attrs.get("num-cores", 0)) or os.cpu_count() or 1
    budget = trials_per_task * len(tasks)
    log = folder / "tuning.log"
    say(f"tuning {len(tasks)} tasks, {budget} trials (log: {log})")
    # By rounds, this machine searches and builds while the GPU machine is given back: a lighter search than
    # MetaSchedule's default (512 candidates evolved 4 times) keeps a round within minutes on 2 cores.
    search = "evolutionary" if rounds is None else ms.search_strategy.EvolutionarySearch(
        population_size=256, genetic_num_iters=2)
    contexts = [
        ms.TuneContext(task.dispatched[0], target=target, space_generator=_space_generator(target, task),
                       search_strategy=search, task_name=task.task_name, num_threads=cores).clone()
        for task in tasks
    ]
    counter = _TrialCounter([task.task_name for task in tasks], say)
    # Builder workers are fresh processes for every batch: let them register no tensor intrinsics (the
    # schedules come to them applied) or, for a CPU, only that CPU's.
    load_intrinsics = functools.partial(load_tensor_intrinsics, _intrinsic_modules(target, half=False))
    if rounds is None:
        builder = ms.builder.LocalBuilder(max_workers=cores, initializer=load_intrinsics)
        runner, scheduler = ms.runner.LocalRunner(), "gradient"
    else:
        from onnxforge.backends.tvm.round_runner import RoundRunner

        # Kept as shared libraries, for a runtime-only TVM; round-robin puts one batch of every task in a round.
        builder = ms.builder.LocalBuilder(max_workers=cores, initializer=load_intrinsics, timeout_sec=120.0,
                                          f_export=_export_library)
        runner, scheduler = RoundRunner(rounds, str(target.attrs["arch"]), say), "round-robin"
    start = time.perf_counter()
    try:
        with _meta_schedule_log(log):
            ms.tune_tasks(
                tasks=contexts,
                task_weights=[float(task.weight) for task in tasks],
                work_dir=str(folder),
                max_trials_global=budget,
                num_trials_per_iter=min(options.batch, trials_per_task),
                builder=builder,
                runner=runner,
                database=database,
                measure_callbacks=[*ms.MeasureCallback.create("default"), counter],
                task_scheduler=scheduler,
            )
    finally:
        if isinstance(runner, ms.runner.LocalRunner):
            runner.pool.shutdown()  # its worker process would otherwise outlive the tuning
    say(f"tuned {len(tasks)} tasks in {time.perf_counter() - start:.0f} s")
    return [task for task, succeeded in zip(tasks, counter.succeeded) if succeeded]


def _space_generator(target: tvm.target.Target, task: ms.ExtractedTask) -> str | ms.space_generator.SpaceGenerator:
    """The target's own design space; for CUDA, tensor-core rules only where the task computes in half precision
    (they need the CUDA tensor intrinsics registered, which takes minutes on a small machine)."""
    if target.kind.name != "cuda":
        return "post-order-apply"
    rules = "cuda-tensorcore" if _uses_half(task.dispatched[0]) else "cuda"
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=rules, mutator_probs=rules)


def _export_library(module: tvm.runtime.Module) -> str:
    """A builder's export: the candidate as a shared library in a fresh temporary folder."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "candidate.so")
    module.export_library(path)
    return path


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
def _tensor_intrinsics(target: tvm.target.Target, half: bool) -> Iterator[None]:
    """Make MetaSchedule's `import tvm.s_tir.tensor_intrin` register only the tensor intrinsics the target needs:
    its CPU's, CUDA's for half precision on a GPU, none for float32 on a GPU.

    The full package parses the TVMScript of every target's intrinsics, in this process and in every builder
    worker, where that can outlast the builder's timeout on a small machine (docs/tvm.md). The stand-in package
    is taken out again afterwards, so that a later full import still registers everything.
    """
    modules = _intrinsic_modules(target, half)
    stand_in = modules is not None and _TENSOR_INTRIN not in sys.modules
    load_tensor_intrinsics(modules)
    try:
        yield
    finally:
        if stand_in:
            del sys.modules[_TENSOR_INTRIN]


def load_tensor_intrinsics(modules: tuple[str, ...] | None) -> None:
    """Register the tensor intrinsics of these modules of tvm.s_tir.tensor_intrin, or of all of them (None)."""
    if modules is None:
        importlib.import_module(_TENSOR_INTRIN)
        return
    if _TENSOR_INTRIN not in sys.modules:
        package = types.ModuleType(_TENSOR_INTRIN)  # an empty stand-in: importing a submodule skips the others
        package.__path__ = list(importlib.util.find_spec(_TENSOR_INTRIN).submodule_search_locations)
        sys.modules[_TENSOR_INTRIN] = package
    for module in modules:
        importlib.import_module(f"{_TENSOR_INTRIN}.{module}")


def _intrinsic_modules(target: tvm.target.Target, half: bool) -> tuple[str, ...] | None:
    """The modules of tvm.s_tir.tensor_intrin that `target` needs; None (all) for an unknown CPU."""
    if target.kind.name == "cuda":
        return ("cuda",) if half else ()
    module = _CPU_INTRINSICS.get(_cpu_arch(target) or "")
    return None if module is None else (module,)


def _needs_half_intrinsics(target: tvm.target.Target, module: tvm.IRModule, folder: Path) -> bool:
    """Whether a CUDA compile needs CUDA's tensor intrinsics: the module computes in half precision, or records of
    `folder` use them. Always False for a CPU, whose intrinsics do not depend on it (no model text is printed)."""
    return target.kind.name == "cuda" and (_uses_half(module) or records_use_tensor_cores(folder))


def records_use_tensor_cores(folder: Path) -> bool:
    """Whether records of `folder` schedule with CUDA's tensor-core intrinsics (those of a half-precision model),
    which must be registered before any record of the folder is read, whatever model it compiles."""
    records = folder / "database_tuning_record.json"
    return records.is_file() and re.search(r'"w?mma_', records.read_text(errors="replace")) is not None


def _uses_half(module: tvm.IRModule) -> bool:
    """Whether any tensor of `module` (Relax or TIR) is float16 or bfloat16."""
    return "float16" in module.script(show_meta=False)


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
