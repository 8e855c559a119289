"""Quantize trained models with onnxforge and with onnxruntime's own tools; time, size and judge them in one run.

    pip install ".[bench]" && apt-get install espeak-ng     # the trained models and the speech synthesizer
    python benchmarks/bench_quant.py                          # about 5 minutes on 2 cores
    python benchmarks/bench_quant.py --quick --cases silero-vad

For each case of cases/ (a sentence encoder, a speech detector, a text-detection CNN, a phoneme recognizer, the last
only with its recorded speech: benchmarks/README.md; a YOLOX detector and a CNN classifier): the fp32 model,
onnxruntime's `quantize_dynamic` and `quantize_static` (ort_quantization.py), onnxsim's dynamic, static and full-graph
int8 (peers.py, in its own environment; `--peers none` leaves them out), and onnxforge's pipelines (OURS),
each given the case's calibration samples as `data=`. Every model is then judged on the case's held-out inputs
(never used to calibrate) against fp32, its file size taken, and all of a case's models timed together in
interleaved blocks (fp32, then each variant, ...; onnxruntime graph optimization "all", thread spinning off).
Writes benchmarks/results/quantization.json and .md (quantization-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx.version_converter

from case_variants import judge_and_time, page_header, run_benchmark, run_pipeline, variant_table
from bench_search import peer_variants
from ort_quantization import ort_quantize_dynamic, ort_quantize_static
from paired_timing import Timing, file_bytes
from cases import CASE_BUILDERS
from cases.trained_case import TrainedCase


# onnxforge's pipelines per case. The OCR detector ships at opset 12; per-channel QDQ needs 13.
OURS: dict[str, dict[str, str]] = {
    "minilm-encoder": {
        "onnxforge int8": "cleanup,fuse,quant",
        "onnxforge int8, min_cosine=0.995": "cleanup,fuse,quant:min_cosine=0.995",
        # int4 in blocks of 32 is not faster than fp32 here at 128 tokens: min_speedup below 1 asks for size first.
        "onnxforge int4 block 32, GPTQ": "cleanup,fuse,quant:bits=4:weight_method=gptq:min_speedup=0.95",
        "onnxforge int4 block 128, GPTQ": "cleanup,fuse,quant:bits=4:granularity=block:128:weight_method=gptq",
    },
    "silero-vad": {
        "onnxforge int8 (auto: static Conv, int8 LSTM)": "cleanup,fuse,quant",
        "onnxforge int8, mode=dynamic": "cleanup,fuse,quant:mode=dynamic",
    },
    "ocr-detector": {
        "onnxforge int8": "cleanup,fuse,quant",
        "onnxforge int8 static": "upgrade-opset:to=17,cleanup,fuse,quant:mode=static",
        "onnxforge int8 static, float_prefix": "upgrade-opset:to=17,cleanup,fuse,quant:mode=static:float_prefix=true",
        "onnxforge int8 static, min_cosine=0.99": (
            "upgrade-opset:to=17,cleanup,fuse,quant:mode=static:min_cosine=0.99"
        ),
    },
    # Its front end (the STFT convolutions /Conv and /Conv_1, the mel MatMul) feeds a log, which magnifies int8's
    # rounding of small values: one variant leaves it float.
    "hama-asr": {
        "onnxforge int8": "cleanup,fuse,quant",
        "onnxforge int8, front end float": "cleanup,fuse,quant:exclude=/Conv+/Conv_1+/MatMul",
        "onnxforge int8, min_cosine=0.99": "cleanup,fuse,quant:min_cosine=0.99",
        "onnxforge int8, phoneme budget": "cleanup,fuse,quant",
    },
    # At the default budget int8 regions do not fit this detector (all in int8, its held-out cosine is about 0.88):
    # the looser budget shows them at the agreement the peers' whole-graph int8 reaches.
    "captcha-detector": {
        "onnxforge int8": "cleanup,fuse,quant",
        "onnxforge int8, min_cosine=0.85": "cleanup,fuse,quant:min_cosine=0.85",
        "onnxforge int8, calibration=percentile": "cleanup,fuse,quant:calibration=percentile",
        "onnxforge int8, regions=false": "cleanup,fuse,quant:regions=false",
    },
    "ocr-classifier": {"onnxforge int8": "cleanup,fuse,quant"},
}
# The peers' int8 modes beside ours (peers.py; --peers none leaves them out): onnxsim's three, whole-graph QDQ among them.
PEER_MODES = (("onnxsim", "dynamic"), ("onnxsim", "static"), ("onnxsim", "full-graph"))
# Error budgets of some pipelines (`optimize --budget`; the others run without one, each pass at its settings).
BUDGETS: dict[str, str] = {
    "onnxforge int8, phoneme budget": f"metric={Path(__file__).resolve().parent / 'metrics' / 'phonemes.py'}"
    ":phoneme_agreement>=0.95",
}


def bench_case(case: TrainedCase, timing: Timing, work: Path, peer_modes: Sequence[tuple[str, str]]) -> dict:
    """Make every variant of one case, judge each on the held-out inputs, and time them all together."""
    variants: dict[str, dict] = {"fp32": {"tool": "as exported", "path": case.model_path, "seconds": 0.0}}
    for label, produce in (
        ("onnxruntime quantize_dynamic", lambda out: ort_quantize_dynamic(case.model_path, out)),
        ("onnxruntime quantize_static", lambda out: ort_quantize_static(case.model_path, out, case.calibration)),
    ):
        outcome = produce(work / f"{case.name}.{label.split()[-1]}.onnx")
        variants[label] = {
            "tool": f"{label} (defaults{', QDQ, per-channel' if 'static' in label else ''}; quant_pre_process first)",
            "path": outcome.model_path,
            "failure": outcome.failure,
            "seconds": round(outcome.seconds, 1),
        }
    if onnx_opset(case.model_path) < 13:  # per-channel QDQ needs opset 13: give onnxruntime's tool that too
        upgraded = work / f"{case.name}.opset17.onnx"
        onnx.save(onnx.version_converter.convert_version(onnx.load(case.model_path), 17), upgraded)
        outcome = ort_quantize_static(upgraded, work / f"{case.name}.quantize_static17.onnx", case.calibration)
        variants["onnxruntime quantize_static, opset 17"] = {
            "tool": "onnx.version_converter to opset 17, then quantize_static as above",
            "path": outcome.model_path,
            "failure": outcome.failure,
            "seconds": round(outcome.seconds, 1),
        }
    for label, (tool, produce) in peer_variants(case, work, lambda name, mode: (name, mode) in peer_modes).items():
        outcome = produce()
        variants[label] = {"tool": tool, "path": outcome.model_path, "failure": outcome.failure,
                           "seconds": round(outcome.seconds, 1)}
    for label, passes in OURS[case.name].items():
        out = work / f"{case.name}.{len(variants)}.onnx"
        budget = BUDGETS.get(label, "none")
        tool = f"optimize --passes {passes} --data CALIBRATION --budget {budget}"
        variants[label] = {"tool": tool, **run_pipeline(case, passes, out, budget)}
    judge_and_time(case, variants, timing, ("bytes", file_bytes))
    return {"case": case.name, "description": case.description, "headline": case.headline, "variants": variants}


def onnx_opset(path: Path) -> int:
    """The default-domain opset of a saved model."""
    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "Quantization of trained models: onnxforge against onnxruntime's own tools",
        setup,
        env,
        "Speed is fp32's median latency over the variant's (above 1: faster), the median over rounds of the ratio of "
        "block medians, with its quartiles. Size is the model file(s) against fp32's. Agreement is measured on "
        "held-out inputs that no tool calibrated on; the headline metric is first.",
    )
    for result in results:
        lines += ["", f"## {result['case']}", "", result["description"], ""]
        lines += variant_table(result["variants"], "size", _size)
        lines += ["", "What each variant is:", ""]
        for label, v in result["variants"].items():
            failed = f" (not applied: {v['failure']})" if v.get("failure") and v["path"] else ""
            lines.append(f"- {label}: {v['tool']}{failed}")
    lines += ["", "## Why onnxforge kept or quantized each layer (`optimize --explain`)", ""]
    for result in results:
        for label, v in result["variants"].items():
            if v.get("notes"):
                lines += [f"### {result['case']}: {label}", "", "```", _summarized(v["notes"]), "```", ""]
    return "\n".join(lines) + "\n"


def _size(variant: dict, fp32: dict) -> str:
    return f"{variant['bytes'] / 1e6:.2f} MB ({100 * variant['bytes'] / fp32['bytes']:.1f}%)"


def _summarized(notes: str, per_layer: int = 8) -> str:
    """The notes with the per-layer lines cut to the first few of each pass (all are in the JSON)."""
    kept, layer_lines = [], 0
    for line in notes.splitlines():
        is_layer = line.startswith("  ") and ": quantized:" in line
        layer_lines += is_layer
        if not is_layer or layer_lines <= per_layer:
            kept.append(line)
    if layer_lines > per_layer:
        kept.append(f"  ... and {layer_lines - per_layer} more layers quantized the same way")
    return "\n".join(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--peers", default="onnxsim", help="peers whose int8 modes (PEER_MODES) run, or none")
    known, rest = parser.parse_known_args(argv)
    names = [] if known.peers == "none" else known.peers.split(",")
    modes = [(name, mode) for name, mode in PEER_MODES if name in names]

    def bench(case: TrainedCase, timing: Timing, work: Path) -> dict:
        return bench_case(case, timing, work, modes)

    return run_benchmark(rest, __doc__.splitlines()[0], list(CASE_BUILDERS), bench, markdown, "quantization")


if __name__ == "__main__":
    sys.exit(main())
