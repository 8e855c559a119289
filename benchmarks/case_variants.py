"""Variants of trained cases: make them with onnxforge, judge, size and time them in one run; the benchmarks'
command line."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from onnxforge import optimize
from onnxforge.ir import save_model
from paired_timing import BenchmarkRun, Timing, interleaved_timing
from cases import missing_packages, trained_cases
from cases.trained_case import TrainedCase, ort_session

RESULTS = Path(__file__).resolve().parent / "results"
# The lossless passes are verified at 1e-4 relative on random inputs, except where the model itself amplifies
# float rounding beyond that: on random images, onnxruntime's own optimization levels disagree by 1.3e-4 on the
# OCR detector's output (on the real held-out images our fusions change it by 1e-6).
VERIFY_RTOL = {"ocr-detector": 2e-3}
# Each case's output error, from a variant's agreement with fp32: what recovery or whitening must cut.
OUTPUT_ERRORS = {
    "ocr-detector": ("relative L2 error of the probability map", lambda agreement: agreement["relative_l2"]),
    "minilm-encoder": ("mean 1 - cosine of the embeddings", lambda agreement: 1 - agreement["mean_cosine"]),
    "hama-asr": ("fraction of fp32's phonemes changed", lambda agreement: 1 - agreement["phonemes_agree"]),
}


def run_pipeline(case: TrainedCase, passes: str, out: Path, budget: str = "none") -> dict:
    """Run `passes` on the case's model with its calibration samples as data; save the result to `out`.

    With no error budget (the default here), each pass runs at the settings it is given: the benchmarks of the
    pass families measure what those settings cost; a benchmark of the budget gives one.

    Returns the path, a failure line naming passes that did not apply (rolled back), the seconds taken and the
    passes' notes (`optimize --explain`).
    """
    started = time.perf_counter()
    rtol = VERIFY_RTOL.get(case.name, 1e-4)
    model, report = optimize(str(case.model_path), passes, data=case.calibration, rtol=rtol, budget=budget)
    seconds = time.perf_counter() - started
    save_model(model, out)
    failed = [f"{r.name}: {r.status} ({r.error})" for r in report.passes if r.status not in ("applied", "unchanged")]
    notes = report.explanation()
    return {"path": out, "failure": "; ".join(failed) or None, "seconds": round(seconds, 1), "notes": notes}


def pruned_variants(case: TrainedCase, pipelines: dict[str, str], timing: Timing, work: Path, stem: str) -> dict:
    """fp32 and one variant per labelled pass list (run with the case's calibration samples as --data), each judged,
    its parameters counted, and all timed together: the result of one case for the model-shrinking benchmarks."""
    variants: dict[str, dict] = {"fp32": {"tool": "as exported", "path": case.model_path, "seconds": 0.0}}
    for label, passes in pipelines.items():
        out = work / f"{case.name}.{stem}{len(variants)}.onnx"
        variants[label] = {"tool": f"optimize --passes {passes} --data CALIBRATION"}
        variants[label].update(run_pipeline(case, passes, out))
    judge_and_time(case, variants, timing, ("params", parameter_count))
    return {"case": case.name, "description": case.description, "variants": variants}


def judge_and_time(
    case: TrainedCase, variants: dict[str, dict], timing: Timing, size: tuple[str, Callable[[Path], int]]
) -> None:
    """Add to each variant with a model its agreement with fp32 (the first variant) on the held-out inputs,
    its size under `size`'s name, and its latency (`latency`: the statistics of all its runs) and speedup from one
    interleaved run of all of them."""
    time_together(case, variants, judge(case, variants, size), timing)


def judge(case: TrainedCase, variants: dict[str, dict], size: tuple[str, Callable[[Path], int]]) -> dict:
    """Add to each variant with a model its agreement with fp32 (the first variant) on the held-out inputs and its
    size under `size`'s name; return the onnxruntime session of each, by label, for `time_together`."""
    usable = [label for label, v in variants.items() if v["path"] is not None]
    sessions = {label: ort_session(variants[label]["path"], settings=variants[label].get("session")) for label in usable}
    reference = case.evaluate(sessions[usable[0]])
    name, measure = size
    for label in usable:
        variants[label]["agreement"] = case.agreement(reference, case.evaluate(sessions[label]))
        variants[label][name] = measure(Path(variants[label]["path"]))
    return sessions


def time_together(case: TrainedCase, variants: dict[str, dict], sessions: dict, timing: Timing) -> None:
    """Time `sessions` (label -> session, fp32's first) in one interleaved run on the case's timing feed; add to each
    variant its latency (`latency`: the statistics of all its runs) and speedup against fp32."""
    timed = interleaved_timing(list(sessions.values()), case.timing_feed, timing)
    for label, summary in zip(sessions, timed):
        variants[label].update(
            median_ms=summary["stats"]["median_ms"],
            latency=summary["stats"],
            speedup=summary.get("speedup", 1.0),
            speedup_iqr=summary.get("speedup_iqr"),
            block_speedups=summary.get("block_speedups"),
            runs_per_block=summary["runs_per_block"],
        )
    for variant in variants.values():
        variant["path"] = str(variant["path"]) if variant["path"] else None


def run_benchmark(
    argv: list[str] | None,
    description: str,
    cases: Sequence[str],
    bench_case: Callable[[TrainedCase, Timing, Path], dict],
    markdown: Callable[[list[dict], dict, dict], str],
    name: str,
) -> int:
    """The command line shared by the trained-model benchmarks: pick cases, build them, bench each, write
    `name`.json and .md (`name`-quick.* with --quick) into results/ or --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", default=",".join(cases), help="comma-separated case names")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter timing blocks (a smoke run)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "onnxforge-trained")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default results/)")
    args = parser.parse_args(argv)
    onnxruntime.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer warns once per tensor
    timing = Timing(blocks=4 if args.quick else 15, block_s=0.1 if args.quick else 0.3, min_runs=3, warmup=3)
    run = BenchmarkRun()
    results, skipped = [], {}
    for case_name in args.cases.split(","):
        missing = missing_packages(case_name)
        if missing:
            skipped[case_name] = f"not installed: {', '.join(missing)}"
            print(f"skipping {case_name}: {skipped[case_name]}", file=sys.stderr)
            continue
        (case,) = trained_cases(args.work, [case_name])
        results.append(bench_case(case, timing, args.work))
    fields = {
        "skipped": skipped,
        "description": (
            f"Batch 1; every model of a case timed in {timing.blocks} rounds of interleaved blocks of the same number "
            f"of runs (each at least {timing.block_s} s of fp32), onnxruntime's default threads, thread spinning off."
        ),
    }
    run.write(args.out, name, args.quick, fields, results, markdown)
    return 0


def page_header(title: str, setup: dict, env: dict, reading: str) -> list[str]:
    """The first lines of a results page: title, machine, versions, how timing was done, how to read it."""
    machine = f"{env.get('processor', 'this machine')} ({env.get('cpu_count', '?')} cores)"
    measured = f"Measured {setup['date']} on {machine}, onnxruntime {onnxruntime.__version__}."
    return [f"# {title}", "", f"{measured} {setup['description']}", "", reading]


def failure_cell(failure: str, limit: int) -> str:
    """A failure shortened to about `limit` characters for a table cell: its head (the tool, its exit status) and
    its tail (where a tool's error output ends with the reason), the middle left to the JSON."""
    if len(failure) <= limit:
        return failure
    head = limit // 4
    return f"{failure[:head]} ... {failure[-(limit - head):]} (the JSON has it all)"


def speed_cell(variant: dict) -> str:
    """A variant's speed against fp32 with its quartiles over rounds, as the tables write it: 1.51x (1.34-1.55)."""
    iqr = variant.get("speedup_iqr")
    return f"{variant['speedup']:.2f}x" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")


def variant_table(variants: dict[str, dict], size: str, describe_size: Callable[[dict, dict], str]) -> list[str]:
    """One table row per variant: speed against fp32 with its quartiles, latency, size, agreement, time taken.

    `describe_size(variant, fp32)` writes the size cell from the variant's and fp32's `size` entries.
    """
    lines = [f"| variant | speed vs fp32 (IQR) | latency | {size} | agreement | time taken |", "|---" * 6 + "|"]
    fp32 = next(iter(variants.values()))
    for label, v in variants.items():
        if v["path"] is None:
            failure = failure_cell(v["failure"], 240)
            lines.append(f"| {label} | failed: {failure} | | | | {v['seconds']} s |")
            continue
        speed = speed_cell(v)
        agreement = ", ".join(f"{k} {val:.4f}" for k, val in v["agreement"].items())
        cells = [label, speed, f"{v['median_ms']:.2f} ms", describe_size(v, fp32), agreement, f"{v['seconds']} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def error_cut_lines(result: dict, pairs: Sequence[tuple[str, str]], what: str) -> list[str]:
    """'<what>, by <the case's output error>:' and, per (before, after) pair of variants, the error of each."""
    name, error = OUTPUT_ERRORS[result["case"]]
    variants, lines = result["variants"], [f"{what}, by the {name}:", ""]
    for first, second in pairs:
        if "agreement" in variants[first] and "agreement" in variants[second]:
            before, after = error(variants[first]["agreement"]), error(variants[second]["agreement"])
            factor = before / max(after, 1e-12)
            lines.append(f"- {first} -> {second}: {before:.4f} -> {after:.4f} ({factor:.2f}x smaller)")
    return lines


def parameter_count(path: Path) -> int:
    """Weights of a saved model, those of Constant nodes included (some exporters store every weight so)."""
    model = onnx.load(path)
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in tensors)


def parameters_cell(variant: dict, fp32: dict) -> str:
    return f"{variant['params'] / 1e6:.2f} M ({100 * variant['params'] / fp32['params']:.0f}%)"
