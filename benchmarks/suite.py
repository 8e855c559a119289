"""The benchmark suite: trained models from pip packages, optimized by onnxforge and by the other tools, in one run.

Each model goes through onnxforge's default pipeline and every other optimizer that installs here, and every result
is judged and timed against fp32 in the same run.

    pip install ".[bench]" && apt-get install espeak-ng   # the models' packages and the speech synthesizer
    python -m benchmarks --quick    # a case per family, a mode per peer, 4 short rounds: results/suite-quick.*
    python -m benchmarks            # every mode of every peer, 15 rounds: results/suite.json, docs/benchmarks.md

For each case of cases/ (a CNN classifier, two CNN detectors, a transformer encoder, a speech detector, a speech
recognizer, which needs its recorded speech: benchmarks/README.md) the variants are: fp32; onnxforge's
`cleanup,fuse,quant` with the case's calibration samples as --data, at the default budget; onnxruntime's
quantize_dynamic and quantize_static (ort_quantization.py) and, on the transformer, its transformer optimizer; every
mode (--quick: one) of every peer (peers.py: each in a virtual environment of its own; a peer that does not install,
or has no driver there, is reported with the reason). Each optimization runs in a fresh process (forked from a
server that has imported this module), where its wall time, CPU time and peak memory are measured: onnxforge's alone,
the others one at a time (--quick: two at a time, their wall times then sharing the cores). Then every model is judged
on the case's held-out inputs against fp32, and all of a case's models are timed together in interleaved blocks
(case_variants.judge and time_together), with nothing running beside. The JSON's setup keeps the suite's own seconds
per step (each case's build, optimizations, judging and timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib.metadata import metadata, packages_distributions
from pathlib import Path

import numpy as np
import onnxruntime

import peers
from case_variants import failure_cell, judge, run_pipeline, speed_cell, time_together
from cases import CASE_BUILDERS, CASE_PACKAGES, missing_packages, trained_cases
from cases.packages import package_version
from cases.trained_case import TrainedCase
from ort_quantization import OrtQuantized, ort_quantize_dynamic, ort_quantize_static
from paired_timing import Timing, file_bytes

from onnxforge.calibration.context import split_samples
from onnxforge.pipeline.budget import DEFAULT_BUDGET
from onnxforge.report import environment, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS_PAGE = HERE.parent / "docs" / "benchmarks.md"
FAMILIES = {  # each case's family; --quick takes the first case of each
    "ocr-classifier": "CNN image classifier",
    "captcha-detector": "CNN detector",
    "ocr-detector": "CNN detector",
    "minilm-encoder": "transformer encoder",
    "silero-vad": "speech detector",
    "hama-asr": "speech recognizer",
}
PIPELINE = "cleanup,fuse,quant"
# onnxruntime's transformer optimizer is meant for transformers: optimize_model's arguments for the cases that are.
TRANSFORMERS = {"minilm-encoder": {"model_type": "bert", "num_heads": 12, "hidden_size": 384}}
# Metrics against the ground truth (the known text) rather than against fp32; the other cases' inputs carry no labels.
TASK_METRICS = {"hama-asr": "phoneme_error_rate"}
# The optimizers compared, run by peers.py; one it has no driver for is reported as not run.
PEER_NAMES = ("onnxsim", "onnxslim", "nncf", "quark", "olive", "inc")
# --quick runs one mode per peer: int8 with the calibration samples, as onnxforge's quant gets them (onnxslim has
# no int8: its simplification).
QUICK_MODES = {
    "onnxsim": "static", "onnxslim": "slim", "nncf": "static", "quark": "static", "olive": "static", "inc": "static"
}
# The peers whose optimizations take longest here (Olive's start-up, Quark's calibration), longest first.
LONGEST_PEERS = ("olive", "quark")
SEARCH_TIMEOUT_S = 300  # what a peer's searching mode may take (onnxsim auto, NNCF accuracy control, INC tune)
# --quick runs the optimizations of the tools other than onnxforge two at a time (their wall times then share the
# cores); onnxforge's, which times its candidates, always runs alone, and nothing runs beside judging and timing.
QUICK_CONCURRENCY = 2
QUICK_TIMING = Timing(blocks=4, block_s=0.1, min_runs=3, warmup=3)
FULL_TIMING = Timing(blocks=15, block_s=0.3, min_runs=3, warmup=3)
FORKS = multiprocessing.get_context("forkserver")  # where each optimization's fresh process comes from (measured)
KIND_STYLES = {  # plot marker and colour of each kind of variant
    "fp32": ("s", "black"),
    "onnxforge": ("*", "tab:red"),
    "onnxruntime": ("o", "tab:blue"),
    "peer": ("^", "tab:gray"),
}


@dataclasses.dataclass(frozen=True)
class Optimization:
    """One way to make a variant of a case: `run(*args)` in a fresh process writes the model and returns an
    `OrtQuantized` or `run_pipeline`'s dict. `own_process`: the tool runs in a process of its own (a peer), whose
    peak memory is the one that counts, not that of the Python that waits for it."""

    label: str
    kind: str
    tool: str
    run: Callable
    args: tuple
    own_process: bool = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case per family, one mode per peer, 4 short rounds")
    parser.add_argument("--cases", help=f"comma-separated cases (default: all): {', '.join(CASE_BUILDERS)}")
    parser.add_argument("--peers", default=",".join(PEER_NAMES), help="comma-separated peers, or none")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of suite.json (default benchmarks/results)")
    parser.add_argument(
        "--page", type=Path, help="the results page, its plots beside it (default docs/benchmarks.md; --quick: "
        "OUT/suite-quick.md)"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "onnxforge-trained",
                        help="where the cases' models are cached and the variants written")
    parser.add_argument("--from-json", type=Path, metavar="SUITE.json", help="write the page of saved results only")
    args = parser.parse_args(argv)
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        default = args.from_json.with_suffix(".md") if payload["setup"]["quick"] else DOCS_PAGE
        write_page(payload, args.page or default)
        return 0
    if args.cases:
        names = args.cases.split(",")
    else:
        names = list(quick_cases()) if args.quick else list(CASE_BUILDERS)
    unknown = sorted(set(names) - set(CASE_BUILDERS))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASE_BUILDERS)}")
    quiet()
    skipped = {name: f"not installed: {', '.join(missing)}" for name in names if (missing := missing_packages(name))}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    cases = (case for name in names if name not in skipped for case in trained_cases(args.work, [name]))
    peer_names = [] if args.peers == "none" else args.peers.split(",")
    payload = run_suite(cases, peer_names, args.quick, args.work)
    payload["setup"].update(command=" ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
                            skipped=skipped)
    name = "suite-quick" if args.quick else "suite"
    write_json(args.out / f"{name}.json", payload)
    page = args.page or (args.out / f"{name}.md" if args.quick else DOCS_PAGE)
    write_page(payload, page)
    print(f"wrote {args.out / (name + '.json')} and {page} in {payload['setup']['seconds_total']} s", file=sys.stderr)
    return 0


def run_suite(cases: Iterable[TrainedCase], peer_names: Sequence[str], quick: bool, work: Path) -> dict:
    """Bench each case against fp32; return what the JSON holds: the setup (date, timing, length, load average, the
    suite's own seconds per step), the machine and versions (each peer's pinned requirements, or why it is not run),
    and one result per case."""
    started, loads = time.perf_counter(), [os.getloadavg()[0]]
    timing = QUICK_TIMING if quick else FULL_TIMING
    concurrency = QUICK_CONCURRENCY if quick else 1
    # Installs each peer's environment on its first use (minutes): before any optimization is timed.
    not_run = {name: peer_failure(name) for name in peer_names}
    step_seconds: dict[str, float | dict] = {"peer environments": round(time.perf_counter() - started, 1)}
    mark = time.perf_counter()
    start_fork_server()
    step_seconds["fork server"] = round(time.perf_counter() - mark, 1)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for built_s, case in timed(cases):
        result, step_seconds[case.name] = bench_case(case, timing, work, not_run, quick, loads)
        step_seconds[case.name] = {"build": round(built_s, 1), **step_seconds[case.name]}
        print(f"  {case.name}: {step_seconds[case.name]} s", file=sys.stderr, flush=True)
        results.append(result)
    loads.append(os.getloadavg()[0])
    setup = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "timing": dataclasses.asdict(timing),
        "concurrent_optimizations": concurrency,
        "onnxforge_budget": DEFAULT_BUDGET,
        "seconds_total": round(time.perf_counter() - started, 1),
        "step_seconds": step_seconds,
        # Sampled at the start, after each optimization and at the end: other processes share the cores.
        "load_average_1min": {"start": loads[0], "end": loads[-1], "max": max(loads), "samples": len(loads)},
    }
    env = {**environment(), "numpy": np.__version__, "peers": {
        name: {"requirements": list(peers.REQUIREMENTS.get(name, ())), "not_run": not_run[name]} for name in peer_names
    }}
    return {"setup": setup, "environment": env, "results": results}


def timed(items: Iterable) -> Iterator[tuple[float, object]]:
    """Each item of `items` with the seconds its iterator took to give it (a lazily built case: its build)."""
    iterator = iter(items)
    while True:
        started = time.perf_counter()
        item = next(iterator, StopIteration)
        if item is StopIteration:
            return
        yield time.perf_counter() - started, item


def peer_failure(name: str) -> str | None:
    """Why a peer cannot run here (no driver in peers.py, or its install failed), or None when it is ready."""
    if name not in peers.PEERS:
        return f"benchmarks/peers.py has no driver for {name}"
    return peers.install_failure(name)


def bench_case(
    case: TrainedCase,
    timing: Timing,
    work: Path,
    not_run: dict[str, str | None],
    quick: bool,
    loads: list[float],
) -> tuple[dict, dict[str, float]]:
    """Make every variant of one case, each in a fresh process (onnxforge's alone, the others one at a time, or
    QUICK_CONCURRENCY at a time when `quick`); judge each on the held-out inputs and time them all together. Returns
    the case's result and the seconds of each of these steps."""
    started = time.perf_counter()
    variants: dict[str, dict] = {"fp32": {"kind": "fp32", "tool": "as shipped", "path": case.model_path}}
    steps = optimizations(case, work, [name for name, why in not_run.items() if why is None], quick)
    seconds = {}
    for kind, group, workers in (("onnxforge", True, 1), ("other tools", False, QUICK_CONCURRENCY if quick else 1)):
        chosen = [step for step in steps if (step.kind == "onnxforge") == group]
        mark = time.perf_counter()
        order = longest_first(chosen)
        with ThreadPoolExecutor(workers) as pool:  # started in that order
            runs = pool.map(lambda step: run_step(case.name, step, started, loads), order)
            made = dict(zip([step.label for step in order], runs))
        seconds[kind] = round(time.perf_counter() - mark, 1)
        variants.update({step.label: {"kind": step.kind, "tool": step.tool, **made[step.label]} for step in chosen})
    note_overlaps(variants)
    for name, why in not_run.items():
        if why is not None:
            variants[name] = {"kind": "peer", "tool": peers.PEERS.get(name, name), "path": None, "failure": why}
    mark = time.perf_counter()
    sessions = judge(case, variants, ("bytes", file_bytes))
    seconds["judge"] = round(time.perf_counter() - mark, 1)
    mark = time.perf_counter()
    time_together(case, variants, sessions, timing)
    seconds["time"] = round(time.perf_counter() - mark, 1)
    task = TASK_METRICS.get(case.name)
    result = {
        "case": case.name,
        "family": FAMILIES.get(case.name, ""),
        "description": case.description,
        "source": model_source(case.name),
        "agreement_metric": next(name for name in case.metrics if name != task),
        "task_metric": task,
        "variants": variants,
        "seconds": round(time.perf_counter() - started, 1),  # its optimizations, judging and timing
    }
    return result, seconds


def longest_first(steps: Sequence[Optimization]) -> list[Optimization]:
    """`steps` with the peers that take longest (LONGEST_PEERS) first: started first, they leave the short ones to
    fill the other worker, and the workers end together."""
    def rank(step: Optimization) -> int:
        name = step.label.split()[0] if step.kind == "peer" else ""
        return LONGEST_PEERS.index(name) if name in LONGEST_PEERS else len(LONGEST_PEERS)

    return sorted(steps, key=rank)


def run_step(case_name: str, step: Optimization, started: float, loads: list[float]) -> dict:
    """`measured(step)` with `window_s`: when its process started and ended, in seconds after `started`; samples the
    load average after it."""
    print(f"  {case_name}: {step.label} ...", file=sys.stderr, flush=True)
    begin = time.perf_counter() - started
    made = measured(step)
    made["window_s"] = [round(begin, 1), round(time.perf_counter() - started, 1)]
    loads.append(os.getloadavg()[0])
    outcome = "made a model" if made["path"] is not None else "failed"
    print(f"  {case_name}: {step.label} {outcome} ({made['window_s'][1] - begin:.1f} s)", file=sys.stderr, flush=True)
    return made


def note_overlaps(variants: dict[str, dict]) -> None:
    """Add `beside` to each variant made in a window: the labels of those whose processes ran at the same time."""
    windows = {label: v["window_s"] for label, v in variants.items() if "window_s" in v}
    for label, (begin, end) in windows.items():
        variants[label]["beside"] = [
            other for other, (b, e) in windows.items() if other != label and b < end and begin < e
        ]


def optimizations(case: TrainedCase, work: Path, peer_names: Sequence[str], quick: bool) -> list[Optimization]:
    """The optimizations of one case, each writing its model under `work`."""
    # What the optimizing process needs of the case: its metrics are closures that do not pickle.
    portable = dataclasses.replace(case, held_out=[], metrics={})
    stem = f"{case.name}.suite"
    steps = [
        Optimization(
            f"onnxforge {PIPELINE}", "onnxforge", f"optimize --passes {PIPELINE} --data CALIBRATION (default budget "
            f"{DEFAULT_BUDGET})", run_pipeline, (portable, PIPELINE, work / f"{stem}-onnxforge.onnx", DEFAULT_BUDGET)
        ),
        Optimization(
            "onnxruntime quantize_dynamic", "onnxruntime", "quantize_dynamic (defaults; quant_pre_process first)",
            ort_quantize_dynamic, (case.model_path, work / f"{stem}-quantize_dynamic.onnx"),
        ),
        Optimization(
            "onnxruntime quantize_static", "onnxruntime", "quantize_static (QDQ, per-channel, MinMax over CALIBRATION; "
            "quant_pre_process first)", ort_quantize_static,
            (case.model_path, work / f"{stem}-quantize_static.onnx", case.calibration),
        ),
    ]
    if case.name in TRANSFORMERS:
        options = TRANSFORMERS[case.name]
        steps.append(Optimization(
            "onnxruntime transformer optimizer", "onnxruntime",
            f"onnxruntime.transformers.optimizer.optimize_model({', '.join(f'{k}={v!r}' for k, v in options.items())})",
            ort_transformer_optimizer, (case.model_path, work / f"{stem}-ort-optimizer.onnx", options),
        ))
    # The peers calibrate on the first three quarters and validate on the last (their accuracy-aware modes), as
    # onnxforge's quant holds out the last quarter of --data for its budget (the same split_samples).
    calibration, validation = split_samples(case.calibration)
    modes = list(peers.peer_modes(calibration, validation))
    for name in peer_names:
        for mode in [QUICK_MODES[name]] if quick else [m for peer, m in modes if peer == name]:
            steps.append(Optimization(
                f"{name} {mode}", "peer", f"{peers.PEERS[name]}; mode {mode}", run_peer_mode,
                (name, mode, case.model_path, work / f"{stem}-{name}-{mode}.onnx", calibration, validation,
                 case.name in TRANSFORMERS), own_process=True,
            ))
    return steps


def start_fork_server() -> None:
    """Start the process that every optimization's process is forked from (`measured`), with this module imported:
    once, before anything is measured, so that no optimization waits for the 2 s of imports a spawned Python needs."""
    FORKS.set_forkserver_preload([__name__])
    # The server imports the module by name, and Python 3.11's ignores our sys.path (a preload that fails to import
    # is skipped in silence, and each forked process would import it again): it finds this folder by PYTHONPATH.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *([saved] if saved else [])])
    try:
        with ProcessPoolExecutor(1, mp_context=FORKS) as pool:  # returns once the server has its imports and forks
            pool.submit(os.getpid).result()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def measured(step: Optimization) -> dict:
    """Run one optimization in a fresh process, forked from the fork server (`start_fork_server`), which has
    imported this module and run nothing: its model's path, why it failed (None if it did not), its wall time and CPU
    time there (of that process and the processes it started) and its peak memory (the largest resident set of that
    process or, for a peer, of the peer's own processes)."""
    try:
        with ProcessPoolExecutor(1, mp_context=FORKS, initializer=quiet) as pool:
            result, seconds, cpu, own_kib, below_kib = pool.submit(_measure, step.run, step.args).result()
    except BrokenProcessPool as died:  # killed for memory, or crashed in native code
        return {"path": None, "failure": f"the optimizing process died: {died}", "seconds": None}
    fields = {"path": result.model_path, "failure": result.failure} if isinstance(result, OrtQuantized) else result
    peak_kib = below_kib if step.own_process else max(own_kib, below_kib)
    return {**fields, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "peak_memory_mb": round(peak_kib * 1024 / 1e6, 1)}


def _measure(run: Callable, args: tuple) -> tuple[OrtQuantized | dict, float, float, int, int]:
    """In the fresh process: `run(*args)` (a failure is a result too), its wall and CPU seconds, and the peak resident
    sets in KiB of this process and of the largest process it started."""
    # Not getrusage's ru_maxrss: a process started by fork and exec reports at least the resident set of its parent
    # at the fork. VmHWM counts from the exec, or in this forked process from the resident set at the fork (what the
    # fork server's imports hold, as a spawned Python would after importing them).
    below = DescendantPeaks(os.getpid())
    below.start()
    started, cpu = time.perf_counter(), cpu_seconds()
    try:
        result = run(*args)
    except Exception as exc:  # noqa: BLE001 - a tool that fails on a model is a result of the benchmark
        result = {"path": None, "failure": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    below.stop()
    return result, seconds, cpu, peak_resident_kib(os.getpid()), below.peak_kib


def cpu_seconds() -> float:
    """User and system CPU seconds of this process and of the children it waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class DescendantPeaks(threading.Thread):
    """Polls the peak resident set of every process below `root` until stopped; `peak_kib` is the largest seen. The
    peak is a high-water mark, so polling misses only what a process grows in its last interval before it ends."""

    def __init__(self, root: int, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval_s, self.peak_kib = root, interval_s, 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            for pid in descendants(self.root):
                self.peak_kib = max(self.peak_kib, peak_resident_kib(pid))

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def descendants(root: int) -> list[int]:
    """The processes below `root`, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name before ")" may hold spaces
        except (OSError, IndexError, ValueError):  # it ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, frontier = [], [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def peak_resident_kib(pid: int) -> int:
    """The peak resident set of a process since its exec (VmHWM) in KiB, 0 when it has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def quiet() -> None:
    """Keep onnxruntime's warnings (one per unused initializer) and its quantizer's (one per tensor) off the output."""
    onnxruntime.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)


def ort_transformer_optimizer(model: Path, out: Path, options: dict) -> dict:
    """onnxruntime's offline transformer optimizer as bench_fusion.py calls it, saved to `out`."""
    from bench_fusion import run_ort_optimizer

    return {"path": out, "failure": None, "notes": run_ort_optimizer(model, out, options)}


def run_peer_mode(
    name: str, mode: str, model: Path, out: Path, calibration: list, validation: list, transformer: bool
) -> OrtQuantized:
    """One mode of a peer (peers.peer_modes) on `model`, writing `out`."""
    modes = peers.peer_modes(calibration, validation, transformer=transformer, search_timeout=SEARCH_TIMEOUT_S)
    return modes[(name, mode)](model, out)


def model_source(case_name: str) -> dict:
    """The pip package a case's model ships in: its name, version and license (as its metadata states it)."""
    if case_name not in CASE_PACKAGES:
        return {}
    package = packages_distributions()[CASE_PACKAGES[case_name][0]][0]
    about = metadata(package)
    classifiers = [c.rsplit(" :: ", 1)[-1] for c in about.get_all("Classifier") or [] if c.startswith("License ::")]
    stated = about.get("License-Expression") or next(iter(classifiers), None) or about.get("License") or "not stated"
    return {"package": package, "version": package_version(package), "license": stated.splitlines()[0]}


def write_page(payload: dict, page: Path) -> None:
    """Write the results page and beside it one plot per case, `<page's stem>-<case>.svg`."""
    page.parent.mkdir(parents=True, exist_ok=True)
    for result in payload["results"]:
        plot(result, page.with_name(f"{page.stem}-{result['case']}.svg"))
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(markdown(payload, page.stem))
    tmp.replace(page)


def plot(result: dict, path: Path) -> None:
    """Speed against fp32 and agreement with it, one point per variant that made a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "onnxforge-benchmarks"  # the same results give the same file
    metric = result["agreement_metric"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    made = [(label, v) for label, v in result["variants"].items() if v["path"] is not None]
    for index, (label, v) in enumerate(made):
        marker, colour = KIND_STYLES[v["kind"]]
        axes.scatter(v["speedup"], v["agreement"][metric], marker=marker, color=colour, s=60 if marker == "*" else 30)
        # Staggered, so that the labels of variants that land on one spot stay readable.
        axes.annotate(label, (v["speedup"], v["agreement"][metric]), fontsize=7, xytext=(4, 3 + 9 * (index % 3)),
                      textcoords="offset points")
    axes.axvline(1.0, color="lightgray", linewidth=0.8, zorder=0)
    axes.margins(x=0.25, y=0.15)  # room for the labels of the outermost points
    axes.set_xlabel("speed against fp32 (above 1: faster)")
    axes.set_ylabel(f"{metric} against fp32 (held out)")
    axes.set_title(f"{result['case']}: speed and agreement")
    figure.tight_layout()
    figure.savefig(path, format="svg", metadata={"Date": None})
    plt.close(figure)


def markdown(payload: dict, stem: str) -> str:
    """The results page: the machine, how it was measured, the models, then a table and a plot per case."""
    setup, env = payload["setup"], payload["environment"]
    load = setup["load_average_1min"]
    timing = setup["timing"]
    concurrency = setup.get("concurrent_optimizations", 1)
    lines = ["# Benchmarks", ""]
    if setup["quick"]:
        lines += [
            f"> **The quick run.** These are the results of `python -m benchmarks --quick`: one mode per peer, "
            f"{timing['blocks']} timing rounds"
            + (f", and the tools other than onnxforge optimizing {concurrency} at a time" if concurrency > 1 else "")
            + f". `python -m benchmarks` (the full suite) rewrites this page with every mode of every peer, "
            f"{FULL_TIMING.blocks} rounds and one optimization at a time.",
            "",
        ]
    lines += [
        f"Written by `{setup.get('command', 'python -m benchmarks')}` (benchmarks/suite.py) on {setup['date']}, in "
        f"{setup['seconds_total']:.0f} s. Every figure on this page comes from that one run: each model was optimized, "
        "judged and timed in it, beside its fp32 baseline.",
        "",
        "## The machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {env.get('processor') or 'not known'}, {env['cpu_count']} cores ({env['machine']}) |",
        f"| load average (1 min) | {load['start']:.2f} at the start, {load['end']:.2f} at the end, at most "
        f"{load['max']:.2f} (sampled {load['samples']} times: at the start, after each optimization, at the end) |",
        f"| Python | {env['python']} |",
        f"| onnxforge, onnx, onnxruntime, numpy | {env['onnxforge']}, {env['onnx']}, {env['onnxruntime']}, "
        f"{env['numpy']} |",
    ]
    for name, peer in env["peers"].items():
        state = f"not run: {peer['not_run']}" if peer["not_run"] else ", ".join(peer["requirements"])
        lines.append(f"| {name} (its own environment) | {state} |")
    lines += [
        "",
        "## How it is measured",
        "",
        "- **Optimization**: each tool runs in a fresh process (forked from one that has only imported the suite's "
        "modules; a peer runs in its own Python beneath it); its wall time and peak memory (the largest resident set "
        "of that process, or of the peer's own processes) are measured there. onnxforge runs "
        f"`{PIPELINE}` with the case's calibration samples as `--data` at the default budget "
        f"({setup.get('onnxforge_budget', DEFAULT_BUDGET)}); "
        "the peers calibrate on the first three quarters of those samples and validate on the last, as onnxforge's "
        "`quant` does. " + concurrency_note(concurrency),
        "- **Agreement**: every model is run on held-out inputs that no tool saw, and compared with fp32 by the "
        "case's measure; the task metric, where the case has labels, is measured against them.",
        f"- **Latency**: batch 1, onnxruntime's CPU provider at graph optimization `all`, its default threads, thread "
        f"spinning off; all of a case's models timed together in {timing['blocks']} rounds of one block each (every "
        f"block the same number of runs, at least {timing['block_s']} s of fp32). Median and the range from the "
        "fastest run to the 90th percentile, in ms; speed = the median over rounds of fp32's block median over the "
        "model's (above 1: faster), with its quartiles over rounds.",
        "- **Size**: the model's file(s), against fp32's.",
        "",
        "## The models",
        "",
        "| case | family | from pip package | license (the package's metadata) |",
        "|---|---|---|---|",
    ]
    for result in payload["results"]:
        source = result["source"]
        package = f"{source['package']} {source['version']}" if source else "made in code"
        lines.append(f"| {result['case']} | {result['family']} | {package} | {source.get('license', '')} |")
    for case_name, why in setup.get("skipped", {}).items():
        lines.append(f"| {case_name} | {FAMILIES.get(case_name, '')} | skipped: {why} | |")
    lines += glance_table(payload["results"])
    lines += suite_time_table(payload)
    for result in payload["results"]:
        lines += ["", f"## {result['case']}", "", f"{result['description']}. Optimized, judged and timed in "
                  f"{result['seconds']:.0f} s.", ""]
        lines += case_table(result)
        lines += ["", f"![{result['case']}: speed and agreement]({stem}-{result['case']}.svg)", "", "What each is:", ""]
        lines += [f"- {label}: {v['tool']}" for label, v in result["variants"].items()]
    return "\n".join(lines) + "\n"


def glance_table(results: Sequence[dict]) -> list[str]:
    """Per case: onnxforge's speed and agreement, the fastest other variant that agrees with fp32 at least as well
    (fp32 itself when none does), and the fastest other variant at any agreement."""
    lines = [
        "",
        "## At a glance",
        "",
        "Speed against fp32 (its quartiles over rounds) and agreement with fp32 on held-out inputs, by each case's "
        "measure; a difference inside the quartiles is within the timing's spread.",
        "",
        "| case | measure | onnxforge | the fastest other at equal or better agreement | the fastest other |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        metric = result["agreement_metric"]
        made = {label: v for label, v in result["variants"].items() if v.get("path") is not None}
        ours = next((v for v in made.values() if v["kind"] == "onnxforge"), None)
        if ours is None:
            continue
        others = {label: v for label, v in made.items() if v["kind"] != "onnxforge"}
        agreeing = {label: v for label, v in others.items() if v["agreement"][metric] >= ours["agreement"][metric]}
        cells = [_glance(label, others[label], metric) if label else "" for label in (
            max(agreeing, key=lambda label: agreeing[label]["speedup"], default=None),
            max(others, key=lambda label: others[label]["speedup"], default=None),
        )]
        lines.append(f"| {result['case']} | {metric} | {_glance('', ours, metric)} | {' | '.join(cells)} |")
    return lines


def _glance(label: str, variant: dict, metric: str) -> str:
    return f"{label + ': ' if label else ''}{speed_cell(variant)} at {variant['agreement'][metric]:.4f}"


def case_table(result: dict) -> list[str]:
    """One row per variant: latency, speed against fp32, size, the optimization's memory and time, agreement, task."""
    agreement, task = result["agreement_metric"], result["task_metric"]
    lines = [
        "| variant | latency, ms: median (fastest-p90) | speed vs fp32 (IQR) | size | peak memory | time "
        f"| {agreement} | {f'task: {task}' if task else 'task metric: none in this case'} |",
        "|---" * 8 + "|",
    ]
    fp32 = next(iter(result["variants"].values()))
    for label, v in result["variants"].items():
        made = [_memory(v), _seconds(v)]
        if v["path"] is None:
            failure = failure_cell(v["failure"], 200).replace("|", "\\|")  # peers' error tails join lines with |
            lines.append(f"| {label} | failed: {failure} | | | {' | '.join(made)} | | |")
            continue
        stats = v["latency"]
        cells = [
            label,
            f"{_ms(stats['median_ms'])} ({_ms(stats['min_ms'])}-{_ms(stats['p90_ms'])})",
            speed_cell(v),
            f"{v['bytes'] / 1e6:.2f} MB ({100 * v['bytes'] / fp32['bytes']:.0f}%)",
            *made,
            f"{v['agreement'][agreement]:.4f}",
            f"{v['agreement'][task]:.4f}" if task else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ms(value: float) -> str:
    """Three significant digits, trailing zeros kept: 37.1, 1.00, 0.0660."""
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}" if value > 0 else "0"


def concurrency_note(concurrency: int) -> str:
    """How the optimizations shared the machine, as the page says it."""
    if concurrency == 1:
        return "One optimization ran at a time."
    return (
        f"onnxforge's optimization ran alone (it times its candidates); the other tools' ran {concurrency} at a time, "
        "so their wall times share the cores with another tool's (the time column marks those that did: shared); "
        "nothing ran beside the judging and the timing."
    )


def suite_time_table(payload: dict) -> list[str]:
    """The suite's own time per step: the peers' environments, then per case its build, onnxforge's optimization,
    the other tools', the judging and the timing (absent from results saved before they were recorded)."""
    steps = payload["setup"].get("step_seconds")
    if not steps:
        return []
    concurrency = payload["setup"].get("concurrent_optimizations", 1)
    others = f"other tools ({concurrency} at a time)" if concurrency > 1 else "other tools"
    lines = [
        "",
        "## Where the suite's time goes",
        "",
        f"Seconds of wall time per step of this run ({payload['setup']['seconds_total']:.0f} s in all). Before the "
        f"first case, the peers' environments were checked (installed on first use) in {steps['peer environments']:.1f}"
        f" s and the process the optimizations are forked from was started in {steps.get('fork server', 0):.1f} s.",
        "",
        f"| case | building the case | onnxforge | {others} | judging | timing | total |",
        "|---" * 7 + "|",
    ]
    columns = ("build", "onnxforge", "other tools", "judge", "time")
    rows = [(result["case"], [steps[result["case"]][column] for column in columns]) for result in payload["results"]]
    rows.append(("all cases", [sum(cells[i] for _, cells in rows) for i in range(len(columns))]))
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells):.1f} |")
    return lines


def _seconds(variant: dict) -> str:
    if variant.get("seconds") is None:
        return ""
    return f"{variant['seconds']} s" + (", shared" if variant.get("beside") else "")


def _memory(variant: dict) -> str:
    return f"{variant['peak_memory_mb']:.0f} MB" if variant.get("peak_memory_mb") else ""


def quick_cases() -> Iterator[str]:
    """The first case of each family."""
    seen = set()
    for name, family in FAMILIES.items():
        if family not in seen:
            seen.add(family)
            yield name


if __name__ == "__main__":
    sys.exit(main())
