"""onnxruntime against TVM, untuned and tuned with MetaSchedule, on a CNN and a transformer encoder, in one run.

    python benchmarks/bench_tvm.py                 # 1,000 trials per tuned model: about an hour on 2 cores
    python benchmarks/bench_tvm.py --trials 64     # a smaller budget
    python benchmarks/bench_tvm.py --quick         # a smoke run: 16 trials, one round
    python benchmarks/bench_tvm.py --records DIR   # reuse the records of an earlier run (no tuning if complete)

Each model is run as exported and after `cleanup,fuse` (with `backend="tvm"`: standard ONNX ops only):
onnxruntime (graph optimization "all", thread spinning off) on the model as exported; TVM with its default
schedules; TVM tuned by MetaSchedule with the stated trial budget, from empty records (the tuning time is
reported; with --records, records of an earlier run are reused and only what they lack is tuned). Every TVM
variant's outputs are compared with onnxruntime's on the timing input. Timing goes in rounds (onnxruntime,
then each TVM variant, then again), each model timed for at least a second with the backend's own
measure (TVM: its time evaluator); a speed ratio is the median over rounds of onnxruntime's median / the
variant's. Writes benchmarks/results/tvm.json and tvm.md (tvm-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")  # TVM's idle workers would steal the cores, like ORT's

import numpy as np

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.backends.base import BackendOptions
from onnxforge.comparison import compare_outputs
from onnxforge.data import random_inputs
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import MeasureOptions
from paired_timing import BenchmarkRun
from torch_models import residual_cnn, transformer_encoder

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    "cnn": ("10-conv residual CNN with BatchNorm, input 1x3x224x224 (torch_models.residual_cnn)", residual_cnn),
    "encoder": (
        "torch.nn.TransformerEncoder, 6 layers, d_model 256, 4 heads, ff 1024, input 1x128x256 "
        "(torch_models.transformer_encoder)",
        transformer_encoder,
    ),
}
TIMING = MeasureOptions(warmup=2, min_repeats=5, min_time_s=1.0, max_time_s=30.0)


def bench_case(name: str, trials: int, rounds: int, threads: int, records: Path) -> dict:
    """Compile, check and time every variant of one case."""
    origin, build = CASES[name]
    exported = build()
    fused, _ = optimize(exported, "cleanup,fuse", backend="tvm", seed=0)
    inputs = random_inputs(skeleton_proto(exported), seed=0)
    ort = get_backend("ort").prepare(exported, BackendOptions(threads=threads, allow_spinning=False))
    expected = ort.run(inputs)
    tvm = get_backend("tvm")
    variants: dict[str, dict] = {"onnxruntime": {"prepared": ort, "compile_s": 0.0}}
    for label, model, tuned in (
        ("TVM untuned", exported, False),
        ("TVM untuned, after fuse", fused, False),
        (f"TVM tuned ({trials} trials)", exported, True),
        (f"TVM tuned ({trials} trials), after fuse", fused, True),
    ):
        extra = {"tune_trials": str(trials), "tune_records": str(records)} if tuned else {}
        started = time.perf_counter()
        compiled = tvm.compile(model, BackendOptions(threads=threads, extra=extra), _progress(name, label))
        prepared = compiled.load()
        error = compare_outputs([expected], [prepared.run(inputs)])
        variants[label] = {"prepared": prepared, "compile_s": time.perf_counter() - started, "error": error}
        print(f"{name}: {label} compiled in {variants[label]['compile_s']:.0f} s, max rel error "
              f"{error.max_rel:.2e}", file=sys.stderr)
    medians: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, variant in variants.items():
            medians[label].append(variant["prepared"].measure(inputs, TIMING).median_ms)
    results = {"case": name, "origin": origin, "variants": {}}
    for label, variant in variants.items():
        ratios = [ort_ms / ms for ort_ms, ms in zip(medians["onnxruntime"], medians[label])]
        results["variants"][label] = {
            "median_ms": float(np.median(medians[label])),
            "round_medians_ms": medians[label],
            "speed_vs_onnxruntime": float(np.median(ratios)),
            "compile_s": round(variant["compile_s"], 1),
            "max_rel_error_vs_onnxruntime": variant["error"].max_rel if "error" in variant else 0.0,
        }
    return results


def _progress(case: str, label: str):
    return lambda line: print(f"{case}: {label}: {line}", file=sys.stderr, flush=True)


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = [
        "# onnxruntime against TVM, untuned and tuned",
        "",
        f"Measured {setup['date']} on {env['processor']} ({env['cpu_count']} cores), "
        f"{setup['threads']} threads each, onnxruntime {env.get('onnxruntime')}, TVM {setup['tvm']}; "
        f"{setup['rounds']} rounds; tuning budget (trials per model) {setup['trials']}, {setup['records']}; "
        f"run took {setup['seconds_total']:.0f} s (load average {setup['load_average_1min']}).",
        "Speed is onnxruntime's median latency / the variant's (above 1: faster than onnxruntime). Compile time "
        "includes tuning. Error: max |TVM - onnxruntime| / max |onnxruntime| on the timing input.",
        "",
    ]
    for case in results:
        lines += [f"## {case['case']}", "", case["origin"], "",
                  "| variant | median | speed vs onnxruntime | compile | error |", "|---|---|---|---|---|"]
        for label, v in case["variants"].items():
            lines.append(f"| {label} | {v['median_ms']:.2f} ms | {v['speed_vs_onnxruntime']:.2f}x | "
                         f"{v['compile_s']:.0f} s | {v['max_rel_error_vs_onnxruntime']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def _trials(text: str) -> dict[str, int]:
    """`N` (every case; key "") or `case=N,case=N`."""
    if "=" not in text:
        return {"": int(text)}
    return {name: int(n) for name, n in (part.split("=") for part in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", default="1000", help="MetaSchedule trials per tuned model: N, or per case "
                        "like cnn=1000,encoder=200")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both runtimes")
    parser.add_argument("--quick", action="store_true", help="16 trials, one round")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: cnn,encoder")
    parser.add_argument("--records", type=Path, help="tuning records of an earlier run to reuse")
    args = parser.parse_args()
    trials, rounds = (_trials("16"), 1) if args.quick else (_trials(args.trials), args.rounds)
    run = BenchmarkRun()
    records = args.records or Path(tempfile.mkdtemp(prefix="onnxforge-tvm-records-"))
    print(f"tuning records: {records}", file=sys.stderr)
    results = [bench_case(name, trials.get(name, trials.get("")), rounds, args.threads, records)
               for name in args.cases.split(",")]
    import tvm

    origin = (f"records folder of an earlier run ({args.records}): tasks it had tuned with the budget reused, "
              "the others tuned now (see the compile times)") if args.records else "tuned from empty records"
    fields = {"trials": trials, "rounds": rounds, "threads": args.threads, "tvm": tvm.__version__, "records": origin}
    run.write(RESULTS, "tvm", args.quick, fields, results, markdown)


if __name__ == "__main__":
    main()
