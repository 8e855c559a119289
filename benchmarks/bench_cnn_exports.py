"""CNNs of the torchvision families exported with dynamic axes by both exporters: fused ops, int8 error, speed.

    python benchmarks/bench_cnn_exports.py                              # every architecture, both exporters
    python benchmarks/bench_cnn_exports.py --quick                      # a smoke run
    python benchmarks/bench_cnn_exports.py --architectures resnet-basic --exporters torchscript

For each architecture of tests/cnn_exports.py (ResNet with basic and bottleneck blocks, MobileNetV3, EfficientNet;
torchvision's own builders where torchvision imports, else the re-implementations there) and exporter (TorchScript
with `dynamic_axes` on batch, height and width; dynamo with the same dims dynamic), six variants of the export
(exporter defaults, BatchNorm folded by the exporter):
- fp32 as exported;
- onnxruntime's offline optimizer: a session at ORT_ENABLE_EXTENDED, and one at ORT_ENABLE_ALL, each saving its
  optimized graph (`SessionOptions.optimized_model_filepath`), which is then loaded as any model is;
- onnxforge `cleanup,fuse` and `cleanup,fuse,quant` (quant's defaults: each layer type stays float unless it was
  measured faster int8 on this machine), with CALIBRATION (8 images) as data;
- onnxforge `cleanup,fuse,quant:measure=false` ("int8 forced"): every layer int8, which shows what quant's
  measurements weighed when it kept layers float.
Every variant's outputs are compared with fp32 on HELD_OUT (8 other images), and all six are timed together in
interleaved blocks (paired_timing: onnxruntime graph optimization "all", thread spinning off) at batch 1 and
TIMED_SIZE x TIMED_SIZE images, since dynamic height and width let the small models run at a realistic size.
Writes benchmarks/results/cnn_exports.json and .md (-quick with --quick).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from case_variants import page_header
from cnn_exports import ARCHITECTURES, export, torchvision_available
from paired_timing import BenchmarkRun, Timing, file_bytes, interleaved_timing
from torch_exports import EXPORTERS
from cases.trained_case import ort_session

import onnxforge
from onnxforge.ir import save_model

TIMED_SIZE = 128
CALIBRATION = [(1, TIMED_SIZE, seed) for seed in range(8)]  # (batch, size, seed) of each image
HELD_OUT = [(1, TIMED_SIZE, seed) for seed in range(100, 108)]
ORT_LEVELS = {
    "onnxruntime offline extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "onnxruntime offline all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PIPELINES = {
    "onnxforge cleanup,fuse": "cleanup,fuse",
    "onnxforge cleanup,fuse,quant": "cleanup,fuse,quant",
    # Every layer int8, as if quant's measurements had found it faster: what int8 costs and buys here.
    "onnxforge int8 forced": "cleanup,fuse,quant:measure=false",
}
INT8_OPS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul"}


def image(batch: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """One feed of `batch` random images, a different one per seed."""
    return {"image": np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)}


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of a saved model; BatchNorms left; Convs running with their activation (onnxruntime's FusedConv, or
    its NCHWc Conv with an activation attribute); SiLUs as one op (QuickGelu); int8 ops."""
    ops = Counter(node.op_type for node in model.graph.node)
    conv_activation = sum(
        node.op_type == "FusedConv" or (node.op_type == "Conv" and any(a.name == "activation" for a in node.attribute))
        for node in model.graph.node
    )
    return {
        "nodes": len(model.graph.node),
        "conv": ops["Conv"] + ops["FusedConv"] + ops["QLinearConv"] + ops["ConvInteger"],
        "batchnorm": ops["BatchNormalization"],
        "conv_activation": conv_activation,
        "silu": ops["QuickGelu"],
        "int8": sum(ops[o] for o in INT8_OPS),
    }


def ort_offline(source: Path, target: Path, level) -> dict:
    """onnxruntime's optimizer at `level`, its optimized graph saved to `target` (as its documentation does it)."""
    started = time.perf_counter()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(target)
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return {"path": target, "failure": None, "seconds": round(time.perf_counter() - started, 1)}


def onnxforge_variant(source: Path, passes: str, target: Path) -> dict:
    """`optimize --passes PASSES --data CALIBRATION` on the export; the passes' statuses and quant's notes."""
    started = time.perf_counter()
    data = [image(*spec) for spec in CALIBRATION]
    model, report = onnxforge.optimize(str(source), passes, data=data, seed=0, budget="none")  # quant as set
    save_model(model, target)
    failed = [f"{r.name}: {r.status} ({r.error})" for r in report.passes if r.status not in ("applied", "unchanged")]
    quant = [r for r in report.passes if r.name.startswith("quant")]
    return {
        "path": target,
        "failure": "; ".join(failed) or None,
        "seconds": round(time.perf_counter() - started, 1),
        "statuses": {r.name: r.status for r in report.passes},
        "quant_notes": quant[0].notes[-3:] if quant else None,
        "quant_stats": quant[0].stats if quant else None,
    }


def agreement(reference: list[np.ndarray], outputs: list[np.ndarray]) -> dict:
    """Worst relative error (max |new - old| / max |old|) and worst cosine of the logits over the held-out images."""
    rel = max(float(np.abs(r - o).max() / np.abs(r).max()) for r, o in zip(reference, outputs))
    cosines = [
        float(r.ravel() @ o.ravel() / (np.linalg.norm(r) * np.linalg.norm(o))) for r, o in zip(reference, outputs)
    ]
    return {"max_rel": rel, "worst_cosine": min(cosines)}


def bench_case(name: str, exporter: str, timing: Timing, work: Path) -> dict:
    arch = ARCHITECTURES[name]
    print(f"{name} {exporter}: exporting", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proto = export(arch, exporter)
    source = work / f"{name}-{exporter}.onnx"
    onnx.save(proto, source)
    variants: dict[str, dict] = {"fp32": {"path": source, "failure": None,
                                          "seconds": round(time.perf_counter() - started, 1)}}
    for label, level in ORT_LEVELS.items():
        variants[label] = ort_offline(source, work / f"{name}-{exporter}.{label.split()[-1]}.onnx", level)
    for label, passes in PIPELINES.items():
        print(f"{name} {exporter}: {passes}", file=sys.stderr, flush=True)
        stem = "".join(c if c.isalnum() else "-" for c in passes)
        variants[label] = onnxforge_variant(source, passes, work / f"{name}-{exporter}.{stem}.onnx")
    usable = [label for label, v in variants.items() if v["path"] is not None]
    sessions = {label: ort_session(variants[label]["path"]) for label in usable}
    held_out = [image(*spec) for spec in HELD_OUT]
    reference = [sessions["fp32"].run(None, feed)[0] for feed in held_out]
    for label in usable:
        outputs = [sessions[label].run(None, feed)[0] for feed in held_out]
        variants[label]["held_out"] = agreement(reference, outputs)
        variants[label]["ops"] = fused_counts(onnx.load(variants[label]["path"]))
        variants[label]["bytes"] = file_bytes(Path(variants[label]["path"]))
    print(f"{name} {exporter}: timing {len(usable)} variants", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    timed = interleaved_timing([sessions[label] for label in usable], image(1, TIMED_SIZE, 0), timing)
    for label, summary in zip(usable, timed):
        variants[label].update(
            median_ms=summary["stats"]["median_ms"],
            speedup=summary.get("speedup", 1.0),
            speedup_iqr=summary.get("speedup_iqr"),
            runs_per_block=summary["runs_per_block"],
        )
    for variant in variants.values():
        variant["path"] = str(variant["path"]) if variant["path"] else None
    return {
        "architecture": name,
        "exporter": exporter,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "input": [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim],
        "load_average_1min": {"before_timing": round(load_before, 2), "after_timing": round(os.getloadavg()[0], 2)},
        "variants": variants,
    }


def _ops_cell(ops: dict) -> str:
    cells = [f"{ops['nodes']} nodes", f"{ops['conv_activation']}/{ops['conv']} Conv+act"]
    cells += [f"{ops[k]} {label}" for k, label in (("batchnorm", "BN"), ("silu", "SiLU"), ("int8", "int8")) if ops[k]]
    return ", ".join(cells)


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "CNNs (ResNet, MobileNetV3, EfficientNet) exported with dynamic axes by TorchScript and dynamo",
        setup,
        env,
        f"Speed is fp32's median latency over the variant's (above 1: faster), the median over rounds of the ratio of "
        f"block medians, with its quartiles; batch 1, {TIMED_SIZE}x{TIMED_SIZE} images. Ops are those of the saved "
        "file: Conv+act counts Convs that run with their activation (onnxruntime's FusedConv or NCHWc Conv) over all "
        "Convs; the onnxforge files get onnxruntime's own fusions again when loaded. Error is against fp32 on 8 "
        "held-out images: worst relative error of the logits and worst cosine.",
    )
    lines += [
        "",
        (
            "| architecture | exporter | variant | ops in the file | speed vs fp32 (IQR) | latency | held-out error "
            "(max rel, cosine) | time taken |"
        ),
        "|---" * 8 + "|",
    ]
    for result in results:
        for label, v in result["variants"].items():
            head = [result["architecture"], f"{result['exporter']} (opset {result['opset']})", label]
            if v["path"] is None:
                lines.append("| " + " | ".join(head) + f" | failed: {v['failure']} | | | | {v['seconds']} s |")
                continue
            iqr = v.get("speedup_iqr")
            speed = f"{v['speedup']:.2f}x" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")
            error = v["held_out"]
            cells = head + [_ops_cell(v["ops"]), speed, f"{v['median_ms']:.3f} ms",
                            f"{error['max_rel']:.1e}, {error['worst_cosine']:.5f}", f"{v['seconds']} s"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "What quant decided (its last notes), passes rolled back, and the load around each timing:", ""]
    for result in results:
        variants = result["variants"]
        notes = "; ".join(variants["onnxforge cleanup,fuse,quant"].get("quant_notes") or [])
        failed = "; ".join(v["failure"] for v in variants.values() if v["path"] and v.get("failure"))
        lines.append(f"- {result['architecture']} {result['exporter']}: load {result['load_average_1min']}; quant: "
                     f"{notes}" + (f"; rolled back: {failed}" if failed else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--quick", action="store_true", help="fewer and shorter timing blocks (a smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    args = parser.parse_args(argv)
    onnxruntime.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)
    timing = Timing(blocks=4 if args.quick else 15, block_s=0.1 if args.quick else 0.3, min_runs=3, warmup=3)
    run = BenchmarkRun()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.architectures.split(","):
            for exporter in args.exporters.split(","):
                results.append(bench_case(name, exporter, timing, Path(folder)))
    fields = {
        "models": "torchvision.models builders" if torchvision_available() else "tests/cnn_exports.py's blocks",
        "description": (
            f"Every variant of a case timed in {timing.blocks} rounds of interleaved blocks of the same number of "
            f"runs (each at least {timing.block_s} s of fp32), onnxruntime's default threads, thread spinning off."
        ),
    }
    run.write(args.out, "cnn_exports", args.quick, fields, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
