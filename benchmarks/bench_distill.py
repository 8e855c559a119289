"""Win back what compression costs: plain, recovered and distilled students of trained models, and the error budget's
headline pipeline, judged, counted and timed in one run.

    pip install ".[bench,torch]"
    python benchmarks/bench_distill.py --distill-seconds 600     # hours on 2 cores: every case, every variant
    python benchmarks/bench_distill.py --quick --cases hama-asr --distill-seconds 60
    python benchmarks/bench_distill.py --cases minilm-encoder --only budget     # the budget's headline only

For each case of cases/ (the text-detection CNN, the sentence encoder, the phoneme recognizer when its recorded
speech is there): structured pruning at 30% and 50% and half-parameter whitened low-rank factorization, each with
recovery and with recovery then `distill` (at most --distill-seconds of training on this machine, on the case's
calibration samples and perturbed copies of them), end to end and block-wise; int4 weights with and without
`distill`; then the error budget's headline: `quant` alone and `prune,quant` under `--budget cosine=0.99` (the
sentence encoder; other cases under their own bound). Every model is judged on the case's held-out inputs (never
trained or calibrated on) against fp32, its parameters counted, and all of a case's models timed together in
interleaved blocks. Writes benchmarks/results/distillation.json and .md (distillation-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from case_variants import error_cut_lines, judge_and_time, page_header, parameter_count, parameters_cell
from case_variants import run_benchmark, run_pipeline, variant_table
from cases.minilm_encoder import with_more_calibration_text
from cases.trained_case import TrainedCase
from paired_timing import Timing
from remote_distill import student_path

# The passes before compression and after it, per case (the encoder and the recognizer are pruned before fuse:
# recovery refits their unfused MatMuls; the detector ships at opset 12 and is upgraded first).
BEFORE = {"ocr-detector": "upgrade-opset:to=17,cleanup,fuse", "minilm-encoder": "cleanup", "hama-asr": "cleanup"}
AFTER = {"ocr-detector": "", "minilm-encoder": "fuse", "hama-asr": "fuse"}
COMPRESSIONS = {
    "prune 30%": "prune:ratio=0.3:method=taylor-free:recover=true",
    "prune 50%": "prune:ratio=0.5:method=taylor-free:recover=true",
    "lowrank 50%": "lowrank:ratio=0.5:method=whitened:recover=true",
}
INT4 = {"minilm-encoder": "quant:bits=4:weight_method=gptq:min_speedup=0.95", "hama-asr": "quant:bits=4:min_speedup=0.95"}
QUANT = {
    "ocr-detector": "upgrade-opset:to=17,cleanup,fuse,quant:mode=static",
    "minilm-encoder": "cleanup,fuse,quant",
    "hama-asr": "cleanup,fuse,quant",
}
# The headline pipelines under each case's budget: the sentence encoder's cosine, the recognizer's phonemes.
METRICS = Path(__file__).resolve().parent / "metrics"
BUDGETS = {  # (how the label names it, --budget)
    "minilm-encoder": ("cosine=0.99", "cosine=0.99"),
    "ocr-detector": ("cosine=0.99", "cosine=0.99"),
    "hama-asr": ("phonemes agree >= 0.95", f"metric={METRICS / 'phonemes.py'}:phoneme_agreement>=0.95"),
}
MORE_CALIBRATION = {"minilm-encoder": 192}  # as the pruning benchmark: the encoder's refit needs more sentences
DISTILL = "distill:steps=100000:time={seconds}:lr={lr}"
LEARNING_RATES = {"ocr-detector": "1e-4", "minilm-encoder": "1e-4", "hama-asr": "1e-4"}  # relative to each weight
settings: dict = {"distill_seconds": 600.0, "only": (), "students": None}


def pipelines_of(case: str, seconds: float) -> dict[str, tuple[str, str]]:
    """Each variant's pass list and error budget, by label."""
    distill = DISTILL.format(seconds=seconds, lr=LEARNING_RATES[case])
    pipelines: dict[str, tuple[str, str]] = {}
    for label, compression in COMPRESSIONS.items():
        pipelines[f"{label}, recover"] = (_joined(case, compression), "none")
        pipelines[f"{label}, recover, distill"] = (_joined(case, compression, distill), "none")
        pipelines[f"{label}, recover, distill blocks"] = (_joined(case, compression, f"{distill}:mode=blocks"), "none")
    if case in INT4:
        int4 = f"cleanup,fuse,{INT4[case]}"
        pipelines["int4"] = (int4, "none")
        pipelines["int4, distill"] = (f"{int4},{distill}", "none")
    name, budget = BUDGETS[case]
    pipelines[f"quant, budget {name}"] = (QUANT[case], budget)
    headline = QUANT[case].replace(BEFORE[case], f"{BEFORE[case]},prune:method=taylor-free:recover=true")
    pipelines[f"prune,quant, budget {name}"] = (headline, budget)
    return pipelines


def distilled_pipelines(case: str, seconds: float) -> dict[str, str]:
    """The pass lists of the variants that distill (those remote_distill.py makes on another machine)."""
    return {label: passes for label, (passes, _) in pipelines_of(case, seconds).items() if "distill" in label}


def bench_case(case: TrainedCase, timing: Timing, work: Path) -> dict:
    """Every variant of one case: made (or taken from --students), judged, counted and timed together."""
    if case.name in MORE_CALIBRATION:
        case = with_more_calibration_text(case, MORE_CALIBRATION[case.name])
    pipelines = pipelines_of(case.name, settings["distill_seconds"])
    if settings["only"]:
        pipelines = {k: v for k, v in pipelines.items() if any(part in k for part in settings["only"])}
    variants: dict[str, dict] = {"fp32": {"tool": "as exported", "path": case.model_path, "seconds": 0.0}}
    for label, (passes, budget) in pipelines.items():
        out = work / f"{case.name}.distill{len(variants)}.onnx"
        variants[label] = {"tool": f"optimize --passes {passes} --data CALIBRATION --budget {budget}"}
        made = settings["students"] and student_path(settings["students"], case.name, label)
        if made and made.exists():
            variants[label].update(_student(made))
        else:
            variants[label].update(run_pipeline(case, passes, out, budget))
    judge_and_time(case, variants, timing, ("params", parameter_count))
    return {"case": case.name, "description": case.description, "variants": variants}


def _student(path: Path) -> dict:
    """A variant made by remote_distill.py: its model, the machine, its passes' time, and as its failure any
    compressing pass that did not apply there (the student is then not what its label says)."""
    made = json.loads(path.with_suffix(".json").read_text())
    passes = made["report"]["passes"]
    missed = [
        f"{p['name']}: {p['status']} on the other machine"
        for p in passes
        if p["name"].split(":")[0] in ("prune", "lowrank", "quant") and p["status"] != "applied"
    ]
    return {
        "path": path,
        "failure": "; ".join(missed) or None,
        "seconds": round(sum(p["seconds"] for p in passes), 1),
        "made_on": made["machine"]["gpu"] or made["machine"]["processor"],
    }


def _joined(case: str, *passes: str) -> str:
    return ",".join(part for part in (BEFORE[case], *passes, AFTER[case]) if part)


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "Distillation and the error budget on trained models",
        setup,
        env,
        f"Speed is fp32's median latency over the variant's (above 1: faster). Agreement is measured on held-out "
        f"inputs that no pass calibrated, refitted or trained on. `distill` trained for at most "
        f"{settings['distill_seconds']:g} s on this machine; its time is in the last column.",
    )
    for result in results:
        lines += ["", f"## {result['case']}", "", result["description"], ""]
        lines += variant_table(result["variants"], "parameters", parameters_cell)
        pairs = [
            (f"{label}, recover", f"{label}, recover, distill{mode}") for label in COMPRESSIONS for mode in ("", " blocks")
        ]
        pairs = [pair for pair in [*pairs, ("int4", "int4, distill")] if set(pair) <= result["variants"].keys()]
        if pairs:
            lines += ["", *error_cut_lines(result, pairs, "Distillation")]
        lines += ["", "Pipelines:", ""]
        lines += [f"- {label}: {v['tool']}" for label, v in result["variants"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--distill-seconds", type=float, default=settings["distill_seconds"])
    parser.add_argument("--only", default="", help="comma-separated parts of the variant labels to run")
    parser.add_argument("--students", type=Path, help="students remote_distill.py made on another machine")
    known, rest = parser.parse_known_args(argv)
    settings["students"] = known.students
    settings["distill_seconds"] = known.distill_seconds
    settings["only"] = tuple(part for part in known.only.split(",") if part)
    return run_benchmark(rest, __doc__.splitlines()[0], list(BEFORE), bench_case, markdown, "distillation")


if __name__ == "__main__":
    sys.exit(main())
