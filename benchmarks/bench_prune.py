"""Prune trained models' channels at 30% and 50%, with and without recovery; time, count and judge them in one run.

    pip install ".[bench]"
    python benchmarks/bench_prune.py            # about 12 minutes on 2 cores
    python benchmarks/bench_prune.py --quick

For the text-detection CNN, the sentence encoder and the phoneme recognizer of cases/ (the last only with its recorded
speech: benchmarks/README.md): the fp32 model and `prune` at two ratios (the CNN also in both scopes, and per layer to
exact channel counts), taylor-free importance, plain and with `recover=true` (both calibrated on the case's
calibration samples, the encoder's with MORE_CALIBRATION sentences), each judged on the held-out inputs against fp32,
its parameters counted, and all timed together in interleaved blocks (fp32 first; onnxruntime graph optimization
"all", thread spinning off). No fine-tuning: this is what pruning a trained model costs before any retraining. Writes
benchmarks/results/pruning.json and .md (pruning-quick.* with --quick).
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
from cases.minilm_encoder import with_more_calibration_text
from cases.trained_case import TrainedCase

# Channels ranked by taylor-free importance on the calibration samples: the output change their removal causes.
# The encoder is pruned before fuse: recovery can refit its Q, K and V MatMuls, not the fused Attention.
PIPELINES = {
    "ocr-detector": "upgrade-opset:to=17,cleanup,fuse,prune:ratio={ratio}:scope={scope}:method=taylor-free{options}",
    "minilm-encoder": "cleanup,prune:ratio={ratio}:scope={scope}:method=taylor-free{options},fuse",
    "hama-asr": "cleanup,prune:ratio={ratio}:scope={scope}:method=taylor-free{options},fuse",
}
# Per layer, every group loses the ratio; global, the least important channels of the whole model go.
SCOPES = {"ocr-detector": ("layer", "global"), "minilm-encoder": ("layer",), "hama-asr": ("layer",)}
# Groups keep multiples of 8 channels (round_to=8, the default); the CNN is also pruned per layer to the exact
# counts (round_to=1), to show what counts between the kernels' blocks of channels cost.
EXACT_COUNTS = {"ocr-detector": (0.3, 0.5)}
# The encoder's refit solves for up to 1,536 weights per output from the real tokens of its calibration sentences
# (about 19 a sentence): its 64 sentences of the other benchmarks are too few (see docs/pruning.md), so it
# calibrates on 192 more.
MORE_CALIBRATION = {"minilm-encoder": 192}


def bench_case(case: TrainedCase, timing: Timing, work: Path) -> dict:
    """Prune one case at each ratio, plain and recovered; judge, count and time every variant."""
    if case.name in MORE_CALIBRATION:
        case = with_more_calibration_text(case, MORE_CALIBRATION[case.name])
    pipelines = {
        _label(scope, ratio, recover): PIPELINES[case.name].format(
            ratio=ratio, scope=scope, options=":recover=true" if recover else ""
        )
        for scope, ratio, recover in itertools.product(SCOPES[case.name], (0.3, 0.5), (False, True))
    }
    for ratio in EXACT_COUNTS.get(case.name, ()):
        exact = PIPELINES[case.name].format(ratio=ratio, scope="layer", options=":round_to=1")
        pipelines[f"{_label('layer', ratio, False)}, round_to=1"] = exact
    return pruned_variants(case, pipelines, timing, work, "prune")


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "Structured pruning of trained models, with and without recovery",
        setup,
        env,
        "Speed is fp32's median latency over the variant's (above 1: faster), with its quartiles over rounds. "
        "Agreement is measured on held-out inputs; recovery was calibrated on other samples. No fine-tuning.",
    )
    for result in results:
        lines += ["", f"## {result['case']}", "", result["description"], ""]
        lines += variant_table(result["variants"], "parameters", parameters_cell)
        pairs = [
            (_label(scope, ratio, False), _label(scope, ratio, True))
            for scope, ratio in itertools.product(SCOPES[result["case"]], (0.3, 0.5))
        ]
        lines += ["", *error_cut_lines(result, pairs, "Recovery")]
        lines += ["", "Pipelines:", ""]
        lines += [f"- {label}: {v['tool']}" for label, v in result["variants"].items()]
    return "\n".join(lines) + "\n"


def _label(scope: str, ratio: float, recover: bool) -> str:
    return f"prune {ratio:.0%} {scope}{', recover' if recover else ''}"


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(argv, __doc__.splitlines()[0], list(PIPELINES), bench_case, markdown, "pruning")


if __name__ == "__main__":
    sys.exit(main())
