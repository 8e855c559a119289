"""Prune trained models' channels at 30% and 50%, with and without recovery; time, count and judge them in one run.

    pip install ".[bench]"
    python benchmarks/bench_prune.py            # about 3 minutes on 2 cores
    python benchmarks/bench_prune.py --quick

For the text-detection CNN and the sentence encoder of trained_models.py: the fp32 model and `prune` at two
ratios, plain and with `recover=true` (calibrated on the case's calibration samples), each judged on the
held-out inputs against fp32, its parameters counted, and all timed together in interleaved blocks (fp32 first;
onnxruntime graph optimization "all", thread spinning off). No fine-tuning: this is what pruning a trained model
costs before any retraining. Writes benchmarks/results/pruning.json and .md (pruning-quick.* with --quick).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

from case_variants import judge_and_time, page_header, run_benchmark, run_pipeline, variant_table
from paired_timing import Timing
from trained_models import TrainedCase

# Prune before fuse on the encoder: the walk does not see through onnxruntime's fused ops (BiasGelu).
PIPELINES = {
    "ocr-detector": "upgrade-opset:to=17,cleanup,fuse,prune:ratio={ratio}{recover}",
    "minilm-encoder": "cleanup,prune:ratio={ratio}{recover},fuse",
}
RTOL = {"ocr-detector": 2e-3}  # see bench_quant.py: the detector amplifies float rounding on random inputs


def bench_case(case: TrainedCase, timing: Timing, work: Path) -> dict:
    """Prune one case at each ratio, plain and recovered; judge, count and time every variant."""
    variants: dict[str, dict] = {"fp32": {"tool": "as exported", "path": case.model_path, "seconds": 0.0}}
    for ratio in (0.3, 0.5):
        for recover in (False, True):
            passes = PIPELINES[case.name].format(ratio=ratio, recover=":recover=true" if recover else "")
            label = f"prune {ratio:.0%}{', recover' if recover else ''}"
            out = work / f"{case.name}.prune{len(variants)}.onnx"
            variants[label] = {"tool": f"optimize --passes {passes} --data CALIBRATION"}
            variants[label].update(run_pipeline(case, passes, out, RTOL.get(case.name, 1e-4)))
    judge_and_time(case, variants, timing, ("params", parameter_count))
    return {"case": case.name, "description": case.description, "variants": variants}


def parameter_count(path: Path) -> int:
    """Weights of a saved model, those of Constant nodes included (some exporters store every weight so)."""
    model = onnx.load(path)
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in tensors)


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
        lines += variant_table(result["variants"], "parameters", _parameters)
        lines += ["", "Pipelines:", ""]
        lines += [f"- {label}: {v['tool']}" for label, v in result["variants"].items()]
    return "\n".join(lines) + "\n"


def _parameters(variant: dict, fp32: dict) -> str:
    return f"{variant['params'] / 1e6:.2f} M ({100 * variant['params'] / fp32['params']:.0f}%)"


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(argv, __doc__.splitlines()[0], list(PIPELINES), bench_case, markdown, "pruning")


if __name__ == "__main__":
    sys.exit(main())
