"""Transformers exported with dynamic axes by both exporters: attention blocks fused, fused ops vs onnxruntime.

For each architecture (tests/transformer_exports.py: BertLike from plain modules and Hugging Face models from
small configs with random weights) and exporter (TorchScript with `dynamic_axes`, dynamo with dynamic shapes),
at each opset: `optimize --passes cleanup,fuse`, then count the attention blocks present (Softmax nodes of the
export) and fused (Attention / MultiHeadAttention), the fused LayerNorm and GELU ops, and the same counts in
what onnxruntime's own transformer optimizer (`optimize_model(path, model_type="bert", ...)`) makes of the
same file. Outputs of the fused model are compared with the export's in onnxruntime (graph optimizations off)
at two sequence lengths.

    python benchmarks/bench_transformer_exports.py                 # every architecture, opset 17 (and BERT 14, 21)
    python benchmarks/bench_transformer_exports.py bert-like vit   # some

Writes benchmarks/results/transformer_exports.json and .md (needs `transformers` and `onnxscript`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from torch_exports import EXPORTERS
from transformer_exports import ARCHITECTURES, export, feeds

import onnxforge

ATTENTION = {"Attention", "MultiHeadAttention"}
LAYER_NORM = {
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
}
GELU = {"Gelu", "BiasGelu", "FastGelu"}
OPSETS = {"bert-like": (14, 17, 21), "bert": (14, 17, 21)}


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "attention": sum(ops[o] for o in ATTENTION),
        "layer_norm": sum(ops[o] for o in LAYER_NORM),
        "gelu": sum(ops[o] for o in GELU),
        "softmax": ops["Softmax"],
        "nodes": len(model.graph.node),
    }


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in inputs.items() if k in names})


def max_rel_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12)) for x, y in zip(a, b))


def onnxruntime_optimizer(path: Path, heads: int, hidden: int) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    # Its symbolic shape inference saves a model into the working folder when a shape stays unknown.
    with warnings.catch_warnings(), contextlib.chdir(path.parent):
        warnings.simplefilter("ignore")
        optimized = optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    return optimized.model


def measure(name: str, exporter: str, opset: int, folder: Path) -> dict:
    arch = ARCHITECTURES[name]
    row: dict = {"architecture": name, "exporter": exporter, "opset": opset}
    start = time.perf_counter()
    try:
        proto = export(arch, exporter, opset)
    except Exception as exc:  # noqa: BLE001 - an exporter that cannot export this model is a row of the table too
        row["error"] = f"export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
        return row
    row["export_opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    path = folder / f"{name}-{exporter}-{opset}.onnx"
    onnx.save(proto, path)
    samples = [feeds(arch, 2, length) for length in arch.lengths]
    fused, report = onnxforge.optimize(proto, "cleanup,fuse", data=samples[:1], seed=0)
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["statuses"] = {r.name: r.status for r in report.passes}
    fused_proto = fused.to_proto()
    row["blocks"] = fused_counts(proto)["softmax"]
    row["onnxforge"] = fused_counts(fused_proto)
    row["max_rel_error"] = max(max_rel_error(run(proto, s), run(fused_proto, s)) for s in samples)
    row["notes"] = [note for r in report.passes for note in dict.fromkeys(r.notes)]
    try:
        row["onnxruntime_optimizer"] = fused_counts(onnxruntime_optimizer(path, arch.heads, arch.hidden))
    except Exception as exc:  # noqa: BLE001 - its failure is a result to report
        row["onnxruntime_optimizer"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return row


def _counts(counts: dict) -> str:
    return "error" if "error" in counts else f"{counts['attention']}, {counts['layer_norm']}, {counts['gelu']}"


def table(rows: list[dict]) -> str:
    lines = [
        (
            "| architecture | exporter | opset | attention fused / blocks | onnxforge Attention, LayerNorm, Gelu | "
            "onnxruntime optimizer Attention, LayerNorm, Gelu | max rel error (2 lengths) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['architecture']} | {row['exporter']} | {row['opset']} | {row['error']} | | | |")
            continue
        ours, theirs = row["onnxforge"], row["onnxruntime_optimizer"]
        lines.append(
            f"| {row['architecture']} | {row['exporter']} | {row['export_opset']} | {ours['attention']} / "
            f"{row['blocks']} | {_counts(ours)} | {_counts(theirs)} | {row['max_rel_error']:.1e} |"
        )
    return "\n".join(lines)


def main(names: list[str]) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names or list(ARCHITECTURES):
            for exporter in EXPORTERS:
                for opset in OPSETS.get(name, (17,)):
                    row = measure(name, exporter, opset, Path(folder))
                    print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
                    rows.append(row)
    results = HERE / "results"
    (results / "transformer_exports.json").write_text(json.dumps(rows, indent=1) + "\n")
    (results / "transformer_exports.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
