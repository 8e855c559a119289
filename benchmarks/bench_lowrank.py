"""Factor trained models' linear layers at two budgets, by plain and whitened SVD; time, count, judge in one run.

    pip install ".[bench]"
    python benchmarks/bench_lowrank.py            # about 10 minutes on 2 cores
    python benchmarks/bench_lowrank.py --quick

For the text-detection CNN, the sentence encoder and the phoneme recognizer of cases/ (the last only with its recorded
speech: benchmarks/README.md): the fp32 model and `lowrank` keeping 75% and 50% of the factored layers' parameters
(ranks chosen together, `ratio=`), by plain SVD, by whitened SVD on the case's calibration samples, and whitened with
`recover=true`; each judged on the held-out inputs against fp32, its parameters counted, and all timed together in
interleaved blocks (fp32 first; onnxruntime graph optimization "all", thread spinning off). No fine-tuning. Writes
benchmarks/results/lowrank.json and .md.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from case_variants import (
    error_cut_lines,
    page_header,
    parameters_cell,
    pruned_variants,
    run_benchmark,
    variant_table,
)
from paired_timing import Timing
from cases.trained_case import TrainedCase

# The encoder is factored before fuse, so that its Q, K and V projections are MatMuls lowrank can factor.
PIPELINES = {
    "ocr-detector": "upgrade-opset:to=17,cleanup,fuse,lowrank:ratio={ratio}{method}",
    "minilm-encoder": "cleanup,lowrank:ratio={ratio}{method},fuse",
    "hama-asr": "cleanup,lowrank:ratio={ratio}{method},fuse",
}
METHODS = {"svd": "", "whitened": ":method=whitened", "whitened, recover": ":method=whitened:recover=true"}
RATIOS = (0.75, 0.5)


def bench_case(case: TrainedCase, timing: Timing, work: Path) -> dict:
    """Factor one case at each budget by each method; judge, count and time every variant."""
    pipelines = {
        _label(ratio, method): PIPELINES[case.name].format(ratio=ratio, method=METHODS[method])
        for ratio, method in itertools.product(RATIOS, METHODS)
    }
    return pruned_variants(case, pipelines, timing, work, "lowrank")


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "Low-rank factorization of trained models: plain and whitened SVD",
        setup,
        env,
        "Speed is fp32's median latency over the variant's (above 1: faster), with its quartiles over rounds. "
        "Agreement is measured on held-out inputs; whitening and recovery were calibrated on other samples. "
        "The budget is the fraction of the factored layers' parameters kept. No fine-tuning.",
    )
    for result in results:
        lines += ["", f"## {result['case']}", "", result["description"], ""]
        lines += variant_table(result["variants"], "parameters", parameters_cell)
        pairs = [(_label(ratio, "svd"), _label(ratio, other)) for ratio in RATIOS for other in list(METHODS)[1:]]
        lines += ["", *error_cut_lines(result, pairs, "Whitening and recovery against plain SVD")]
        lines += ["", "Pipelines:", ""]
        lines += [f"- {label}: {v['tool']}" for label, v in result["variants"].items()]
    return "\n".join(lines) + "\n"


def _label(ratio: float, method: str) -> str:
    return f"lowrank {ratio:.0%}, {method}"


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(argv, __doc__.splitlines()[0], list(PIPELINES), bench_case, markdown, "lowrank")


if __name__ == "__main__":
    sys.exit(main())
