"""The default pipeline under the error budget with and without the labels bound: what keeping the decisions of
score outputs costs in speed, and what it keeps.

    python benchmarks/bench_budget.py                          # hama-asr and ocr-classifier; results/budget-labels.*
    python benchmarks/bench_budget.py --quick --cases ocr-classifier

For each case (a CTC phoneme recognizer whose output is a LogSoftmax, a text-direction classifier whose output is
a Softmax): fp32, and `cleanup,fuse,quant` with the case's calibration samples as `data=` under each of BUDGETS,
judged on the case's held-out inputs against fp32 and timed together in interleaved blocks (case_variants.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from case_variants import judge_and_time, page_header, run_benchmark, run_pipeline, variant_table
from paired_timing import Timing, file_bytes
from cases.trained_case import TrainedCase

PIPELINE = "cleanup,fuse,quant"
BUDGETS = ("cosine=0.99", "cosine=0.99,labels=0.98", "cosine=0.99,labels=0.99", "cosine=0.99,labels=0.995")
CASES = ("hama-asr", "ocr-classifier")


def bench_case(case: TrainedCase, timing: Timing, work: Path) -> dict:
    variants: dict[str, dict] = {"fp32": {"tool": "as exported", "path": case.model_path, "seconds": 0.0}}
    for budget in BUDGETS:
        out = work / f"{case.name}.budget{len(variants)}.onnx"
        tool = f"optimize --passes {PIPELINE} --data CALIBRATION --budget {budget}"
        variants[f"budget {budget}"] = {"tool": tool, **run_pipeline(case, PIPELINE, out, budget)}
    judge_and_time(case, variants, timing, ("bytes", file_bytes))
    return {"case": case.name, "description": case.description, "headline": case.headline, "variants": variants}


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "The error budget's labels bound: the default pipeline with and without it",
        setup,
        env,
        "Speed is fp32's median latency over the variant's (above 1: faster), the median over rounds of the ratio of "
        "block medians, with its quartiles. Agreement is measured against fp32 on held-out inputs that no pass "
        "calibrated on (the budget itself is measured on the last quarter of the calibration samples).",
    )
    for result in results:
        lines += ["", f"## {result['case']}", "", result["description"], ""]
        lines += variant_table(result["variants"], "size", _size)
        lines += ["", "Why each layer was kept or quantized (`optimize --explain`) is in the JSON's `notes`."]
    return "\n".join(lines) + "\n"


def _size(variant: dict, fp32: dict) -> str:
    return f"{variant['bytes'] / 1e6:.2f} MB ({100 * variant['bytes'] / fp32['bytes']:.1f}%)"


if __name__ == "__main__":
    sys.exit(run_benchmark(None, __doc__.splitlines()[0], CASES, bench_case, markdown, "budget-labels"))
