"""Time onnxruntime on models before and after `cleanup`, paired and interleaved, on this machine.

    python benchmarks/bench_cleanup.py            # about 2 minutes on 2 cores
    python benchmarks/bench_cleanup.py --quick    # a smoke run, under a minute

For each model: run `cleanup` through `onnxforge.optimize`, save both models (file sizes), check that both
give the same outputs, then for onnxruntime graph optimization "all" and "disable" time the two sessions in
interleaved blocks A, B, A, B, ... with intra-op thread spinning off (see benchmarks/README.md, "How two models
are timed in one process"). Writes benchmarks/results/cleanup.json and cleanup.md (cleanup-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.backends.base import BackendOptions
from onnxforge.comparison import compare_outputs
from onnxforge.data import random_inputs
from onnxforge.examples import build_example_model
from onnxforge.ir import Model, load_model, save_model
from onnxforge.ir.shapes import skeleton_proto
from paired_timing import BenchmarkRun, Timing, file_bytes, paired_timing
from torch_models import residual_cnn, transformer_encoder

RESULTS = Path(__file__).resolve().parent / "results"
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = ("squeezenet", "shufflenet", "resnet50")
LEVELS = ("all", "disable")


@dataclass
class Case:
    """A model to benchmark: a name, where it comes from, and how to build it."""

    name: str
    origin: str
    build: Callable[[], Model]


def cases(quick: bool) -> list[Case]:
    """The models of this benchmark; the PyTorch ones only when torch is installed."""
    found = [Case("example", "onnxforge.examples.build_example_model()", lambda: load_model(build_example_model()))]
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: skipping the PyTorch-exported models", file=sys.stderr)
    else:
        found.append(
            Case(
                "encoder",
                "torch.nn.TransformerEncoder, 6 layers, d_model 256, 4 heads, ff 1024, input 1x128x256, "
                "from_torch (TorchScript exporter, opset 17, static shapes)",
                transformer_encoder,
            )
        )
        found.append(
            Case(
                "cnn",
                "10-conv residual CNN with BatchNorm, input 1x3x224x224, "
                "from_torch (TorchScript exporter, opset 17, static shapes)",
                residual_cnn,
            )
        )
    for name in LIGHT_MODELS[:2] if quick else LIGHT_MODELS:
        path = LIGHT_DIR / f"light_{name}.onnx"
        if path.is_file():
            found.append(Case(f"light_{name}", f"onnx package: backend/test/data/light/{path.name}", _loader(path)))
        else:
            print(f"{path} not found: skipping it", file=sys.stderr)
    return found


def _loader(path: Path) -> Callable[[], Model]:
    return lambda: load_model(path)


def bench_case(case: Case, timing: Timing, threads: int | None, workdir: Path) -> dict:
    """Clean up one model, check it, and time it before and after at each onnxruntime optimization level."""
    print(f"{case.name}: building", file=sys.stderr, flush=True)
    load = round(os.getloadavg()[0], 2)
    original = case.build()
    optimized, report = optimize(original, "cleanup", seed=0)
    record = report.passes[0]
    before_path = save_model(original, workdir / f"{case.name}.onnx")
    after_path = save_model(optimized, workdir / f"{case.name}.cleanup.onnx")
    feed = random_inputs(skeleton_proto(original), seed=0)
    result = {
        "model": case.name,
        "origin": case.origin,
        "inputs": {name: list(value.shape) for name, value in feed.items()},
        "cleanup": {
            "status": record.status,
            "seconds": round(record.seconds, 4),
            "stats": record.stats,
            "error": record.error,
        },
        "nodes": {"before": report.before.nodes, "after": report.after.nodes},
        "file_bytes": {"before": file_bytes(before_path), "after": file_bytes(after_path)},
        "load_average_1min_at_start": load,
        "levels": {},
    }
    backend = get_backend("ort")
    for level in LEVELS:
        options = BackendOptions(threads=threads, graph_optimization=level, allow_spinning=False)
        prepared_before = backend.prepare(before_path, options)
        prepared_after = backend.prepare(after_path, options)
        error = compare_outputs([prepared_before.run(feed)], [prepared_after.run(feed)])
        print(f"{case.name}: timing with graph optimization '{level}'", file=sys.stderr, flush=True)
        measured = paired_timing(prepared_before, prepared_after, feed, timing)
        measured["max_rel_error"] = error.max_rel
        result["levels"][level] = measured
        del prepared_before, prepared_after
    return result


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    """The results as a Markdown page: setup, machine, and one table row per model and level."""
    lines = [
        "# cleanup: onnxruntime latency before and after",
        "",
        f"Measured {setup['date']} with `python benchmarks/bench_cleanup.py{' --quick' if setup['quick'] else ''}`.",
        f"Machine: {env['processor']}, {env['cpu_count']} logical CPUs, {env['machine']}; "
        f"onnxruntime {env['onnxruntime']} (CPU execution provider), onnx {env['onnx']}, "
        f"Python {env['python']}, onnxforge {env['onnxforge']}.",
        f"Timing: {setup['description']}",
        f"Load average (1 min) of the machine at start and end: {setup['load_average_1min']['start']} and "
        f"{setup['load_average_1min']['end']}; the run took {setup['seconds_total']} s.",
        "",
        "| model | nodes | file size | ORT graph opt. | median before | median after | speedup | IQR of speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        nodes = f"{r['nodes']['before']} -> {r['nodes']['after']}"
        size = f"{_size(r['file_bytes']['before'])} -> {_size(r['file_bytes']['after'])}"
        if r["cleanup"]["status"] != "applied":
            nodes += f" (cleanup {r['cleanup']['status']})"
        for level, m in r["levels"].items():
            low, high = m["speedup_iqr"]
            lines.append(
                f"| {r['model']} | {nodes} | {size} | {level} | {m['before']['median_ms']:.3f} ms | "
                f"{m['after']['median_ms']:.3f} ms | {m['speedup']:.3f}x | {low:.3f} .. {high:.3f} |"
            )
    lines += [
        "",
        "Median before/after: over all timed runs of that model. Speedup: the median, over the block pairs, of "
        "(median of the original's block) / (median of the cleaned-up model's block); above 1 the cleaned-up "
        "model is faster. IQR: the 25th and 75th percentiles of those per-pair ratios, a measure of the noise; "
        "a speedup whose IQR contains 1.000 is no measured difference.",
        "",
        "Models:",
        "",
    ]
    lines += [
        f"- {r['model']}: {r['origin']}; inputs {r['inputs']}; cleanup {r['cleanup']['status']} in "
        f"{r['cleanup']['seconds']:.2f} s; load average when its timing started {r['load_average_1min_at_start']}"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and models (a smoke run)")
    parser.add_argument("--blocks", type=int, help="pairs of timed blocks per model and level (default 20, quick 4)")
    parser.add_argument("--block-seconds", type=float, help="length of a block (default 0.2 s, quick 0.1 s)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument("--models", help="comma-separated subset of: example, encoder, cnn, light_<name>")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default results/)")
    args = parser.parse_args(argv)
    onnxruntime.set_default_logger_severity(3)
    timing = Timing(
        blocks=args.blocks or (4 if args.quick else 20),
        block_s=args.block_seconds or (0.1 if args.quick else 0.2),
        min_runs=2 if args.quick else 3,
        warmup=3,
    )
    selected = cases(args.quick)
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        selected = [c for c in selected if c.name in wanted]
    run = BenchmarkRun()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cleanup-") as tmp:
        for case in selected:
            results.append(bench_case(case, timing, args.threads, Path(tmp)))
    fields = {
        "blocks": timing.blocks,
        "block_seconds": timing.block_s,
        "min_runs_per_block": timing.min_runs,
        "warmup_runs": timing.warmup,
        "threads": args.threads or "onnxruntime default",
        "description": (
            f"onnxruntime CPU, intra-op threads {args.threads or 'default'}, thread spinning off, "
            f"{timing.blocks} interleaved block pairs (before, after, before, after, ...) of the same number of runs, "
            f"each block at least {timing.block_s} s of the original model (and {timing.min_runs} runs); "
            "one random input, the same for both models; the process also runs the other models, one at a time."
        ),
    }
    run.write(args.out, "cleanup", args.quick, fields, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
