"""Time onnxruntime on models as exported, after `cleanup,fuse`, and after onnxruntime's transformer optimizer.

    python benchmarks/bench_fusion.py            # about a minute on 2 cores
    python benchmarks/bench_fusion.py --quick    # a smoke run, about 30 seconds

For each model: run `cleanup,fuse` through `onnxforge.optimize` (verified as usual, plus the error on the timing
input), run `onnxruntime.transformers.optimizer.optimize_model` where it applies (the transformers), count
nodes, fused ops and fused attention blocks, check all variants give the original's outputs, time them in
interleaved blocks (original, fuse, ORT optimizer, original, ...) with onnxruntime's graph optimization at "all"
and thread spinning off, and try onnxruntime's `quantize_dynamic` on each. Writes benchmarks/results/fusion.json
and fusion.md (fusion-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.backends.base import BackendOptions
from onnxforge.comparison import compare_outputs
from onnxforge.ir import Model, save_model
from paired_timing import BenchmarkRun, Timing, file_bytes, interleaved_timing
from torch_models import bert_like, residual_cnn, transformer_encoder

RESULTS = Path(__file__).resolve().parent / "results"
PASSES = "cleanup,fuse"
ATTENTION_OPS = {"Attention", "MultiHeadAttention"}
VOCAB = 1000


@dataclass
class Case:
    """A model to benchmark: how to build it and its timing input, and how to call ORT's transformer optimizer."""

    name: str
    origin: str
    build: Callable[[], tuple[Model, dict[str, np.ndarray]]]
    ort_optimizer: dict | None  # optimize_model's model_type, num_heads, hidden_size; None: not a transformer


def cases() -> list[Case]:
    return [
        Case(
            "cnn",
            "10-conv residual CNN with BatchNorm, input 1x3x224x224, from_torch (TorchScript exporter, opset 17, "
            "static shapes, do_constant_folding=False: BatchNormalization stays in the graph)",
            _cnn,
            None,
        ),
        Case(
            "encoder",
            "torch.nn.TransformerEncoder, 6 layers, d_model 256, 4 heads, ff 1024, input 1x128x256, "
            "from_torch (TorchScript exporter, opset 17, static shapes)",
            _encoder,
            {"model_type": "bert", "num_heads": 4, "hidden_size": 256},
        ),
        Case(
            "bert",
            f"BertLike of tests/model_builders.py: 6 layers, hidden 384, 6 heads, GELU MLP 1536, vocab {VOCAB}, "
            "inputs input_ids and attention_mask 1x128 (the last 16 positions masked), "
            "from_torch (TorchScript exporter, opset 17, static shapes)",
            _bert,
            {"model_type": "bert", "num_heads": 6, "hidden_size": 384},
        ),
    ]


def _cnn() -> tuple[Model, dict]:
    rng = np.random.default_rng(0)
    return residual_cnn(do_constant_folding=False), {"x": rng.standard_normal((1, 3, 224, 224), dtype=np.float32)}


def _encoder() -> tuple[Model, dict]:
    rng = np.random.default_rng(0)
    return transformer_encoder(), {"x": rng.standard_normal((1, 128, 256), dtype=np.float32)}


def _bert() -> tuple[Model, dict]:
    rng = np.random.default_rng(0)
    mask = np.ones((1, 128), np.int64)
    mask[:, -16:] = 0
    feed = {"input_ids": rng.integers(0, VOCAB, (1, 128)).astype(np.int64), "attention_mask": mask}
    return bert_like(vocab=VOCAB), feed


def op_histogram(proto: onnx.ModelProto) -> Counter:
    """Op types of the main graph, contrib ops written with their domain (com.microsoft.Attention)."""
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in proto.graph.node)


def structure(proto: onnx.ModelProto, original: Counter) -> dict:
    """Node count, op types this variant has that the original has not (what fusion made), fused attention."""
    ops = op_histogram(proto)
    return {
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "new_ops": {op: n for op, n in sorted(ops.items()) if op not in original},
        "attention_fused": sum(n for op, n in ops.items() if op.rsplit(".", 1)[-1] in ATTENTION_OPS),
    }


def run_ort_optimizer(source: Path, target: Path, options: dict) -> dict:
    """onnxruntime's offline transformer optimizer with its defaults for CPU; what it reports it fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    started = time.perf_counter()
    # Its symbolic shape inference saves a model into the working folder when a shape stays unknown: not ours.
    with _quiet_logging(), contextlib.chdir(target.parent):
        optimized = optimize_model(str(source), use_gpu=False, **options)
        optimized.save_model_to_file(str(target))
    fused = optimized.get_fused_operator_statistics()
    return {
        "call": f"optimize_model(path, use_gpu=False, {', '.join(f'{k}={v!r}' for k, v in options.items())})",
        "seconds": round(time.perf_counter() - started, 2),
        "fused_operator_statistics": {k: v for k, v in fused.items() if v},
    }


def try_quantize(source: Path, target: Path, feed: dict, reference: dict) -> dict:
    """Does onnxruntime's quantize_dynamic (int8 weights, its defaults) run on this model, and the result run?

    When it fails on the model as it is, it is tried once more after onnxruntime's documented pre-processing
    (`quant_pre_process`, symbolic shape inference that knows the contrib ops; no optimization).
    """
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    result: dict = {}
    try:
        with _quiet_logging():
            quantize_dynamic(source, target)
        result["quantize_dynamic"] = "ran"
    except Exception as exc:  # the question is whether it works: any failure is the answer
        result["error_as_is"] = f"{type(exc).__name__}: {_first_line(exc)}"
        prepared_source = target.with_name(f"{source.stem}.preprocessed.onnx")
        try:
            with _quiet_logging():
                quant_pre_process(str(source), str(prepared_source), skip_optimization=True)
                quantize_dynamic(prepared_source, target)
        except Exception as again:
            result.update(quantize_dynamic="failed", error=f"{type(again).__name__}: {_first_line(again)}")
            return result
        result["quantize_dynamic"] = "ran after quant_pre_process"
    proto = onnx.load(str(target), load_external_data=False)
    ops = op_histogram(proto)
    result["quantized_ops"] = {op: n for op, n in sorted(ops.items()) if _is_int8_op(op)}
    result["bytes"] = file_bytes(target)
    try:
        prepared = get_backend("ort").prepare(target, BackendOptions(allow_spinning=False))
        comparison = compare_outputs([reference], [prepared.run(feed)])
    except Exception as exc:
        result.update(runs=False, error=f"{type(exc).__name__}: {_first_line(exc)}")
        return result
    result.update(runs=True, max_rel_error_vs_original=comparison.max_rel, min_cosine_vs_original=comparison.min_cosine)
    return result


def bench_case(case: Case, timing: Timing, threads: int | None, workdir: Path) -> dict:
    """Fuse one model, run ORT's optimizer on it, check, time and quantize every variant."""
    print(f"{case.name}: building", file=sys.stderr, flush=True)
    original, feed = case.build()
    paths = {"original": save_model(original, workdir / f"{case.name}.onnx")}
    print(f"{case.name}: {PASSES}", file=sys.stderr, flush=True)
    fused, report = optimize(original, PASSES, seed=0, data=[feed])
    paths["fuse"] = save_model(fused, workdir / f"{case.name}.fuse.onnx")
    ort_optimizer = None
    if case.ort_optimizer is not None:
        print(f"{case.name}: onnxruntime.transformers.optimizer", file=sys.stderr, flush=True)
        ort_optimizer = run_ort_optimizer(paths["original"], workdir / f"{case.name}.ortopt.onnx", case.ort_optimizer)
        paths["ort_optimizer"] = workdir / f"{case.name}.ortopt.onnx"
    protos = {name: onnx.load(str(path)) for name, path in paths.items()}
    original_ops = op_histogram(protos["original"])
    result = {
        "model": case.name,
        "origin": case.origin,
        "inputs": {name: list(value.shape) for name, value in feed.items()},
        "attention_blocks": original_ops["Softmax"],  # one Softmax per attention block in these models
        "fuse": {
            "passes": [
                {"name": r.name, "status": r.status, "seconds": round(r.seconds, 3), "stats": r.stats, "error": r.error}
                for r in report.passes
            ],
            "max_rel_error_random_inputs": report.error.max_rel if report.error else None,
            "max_rel_error_timing_input": report.data_error.max_rel if report.data_error else None,
        },
        "ort_optimizer": ort_optimizer,
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "variants": {},
    }
    backend = get_backend("ort")
    options = BackendOptions(threads=threads, graph_optimization="all", allow_spinning=False)
    prepared = {name: backend.prepare(path, options) for name, path in paths.items()}
    outputs = {name: p.run(feed) for name, p in prepared.items()}
    print(f"{case.name}: timing {', '.join(prepared)}", file=sys.stderr, flush=True)
    timed = interleaved_timing([p.session for p in prepared.values()], feed, timing)
    for (name, path), measured in zip(paths.items(), timed):
        comparison = compare_outputs([outputs["original"]], [outputs[name]])
        print(f"{case.name}: quantize_dynamic on {name}", file=sys.stderr, flush=True)
        result["variants"][name] = {
            **structure(protos[name], original_ops),
            "file_bytes": file_bytes(path),
            "max_rel_error_vs_original": comparison.max_rel,
            **measured,
            "quantization": try_quantize(path, workdir / f"{path.stem}.int8.onnx", feed, outputs["original"]),
        }
    if "ort_optimizer" in result["variants"]:
        # Per round, (original / fuse) / (original / ORT's) is ORT's block median / ours: above 1, ours is faster.
        variants = result["variants"]
        ours, theirs = variants["fuse"]["block_speedups"], variants["ort_optimizer"]["block_speedups"]
        q25, q50, q75 = (float(q) for q in np.percentile([a / b for a, b in zip(ours, theirs)], [25, 50, 75]))
        result["fuse_vs_ort_optimizer"] = {"speedup": q50, "speedup_iqr": [round(q25, 4), round(q75, 4)]}
    return result


def markdown(results: list[dict], setup: dict, env: dict) -> str:
    """The results as a Markdown page: setup, machine, one row per model and variant, then what was fused."""
    lines = [
        "# fusion: onnxruntime latency of the exported model, after `cleanup,fuse`, after ORT's optimizer",
        "",
        f"Measured {setup['date']} with `python benchmarks/bench_fusion.py{' --quick' if setup['quick'] else ''}`.",
        f"Machine: {env['processor']}, {env['cpu_count']} logical CPUs, {env['machine']}; "
        f"onnxruntime {env['onnxruntime']} (CPU execution provider), onnx {env['onnx']}, "
        f"Python {env['python']}, onnxforge {env['onnxforge']}.",
        f"Timing: {setup['description']}",
        f"Load average (1 min) of the machine at start and end: {setup['load_average_1min']['start']} and "
        f"{setup['load_average_1min']['end']}; the run took {setup['seconds_total']} s.",
        "",
        "| model | variant | nodes | attention fused | median | speedup vs original | IQR | max rel. error | "
        "quantize_dynamic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, v in r["variants"].items():
            speedup = f"{v['speedup']:.3f}x" if "speedup" in v else "1 (baseline)"
            iqr = f"{v['speedup_iqr'][0]:.3f} .. {v['speedup_iqr'][1]:.3f}" if "speedup_iqr" in v else ""
            lines.append(
                f"| {r['model']} | {name} | {v['nodes']} | {v['attention_fused']} of {r['attention_blocks']} | "
                f"{v['stats']['median_ms']:.3f} ms | {speedup} | {iqr} | {v['max_rel_error_vs_original']:.2g} | "
                f"{_quantization_cell(v['quantization'])} |"
            )
    lines += [
        "",
        "Speedup: the median, over the rounds of interleaved blocks, of (median of the original's block) / "
        "(median of this variant's block); above 1 is faster than the model as exported. IQR: the 25th and 75th "
        "percentiles of those per-round ratios; a speedup whose IQR contains 1.000 is no measured difference. "
        "Attention fused: Attention or MultiHeadAttention nodes, of the Softmax nodes (one per attention block) "
        "of the original. Max rel. error: max|variant - original| / max|original| on the timing input, "
        "both run by onnxruntime at level all. quantize_dynamic: onnxruntime.quantization.quantize_dynamic with "
        "its defaults (int8 weights) on that variant (when it fails on the model as it is, once more after "
        "onnxruntime's `quant_pre_process`, whose error on the model as it is is in the JSON), the number of int8 "
        "ops (MatMulInteger, ConvInteger, QAttention, ...; the DynamicQuantizeLinear nodes feeding them not "
        "counted), and the worst output cosine against the fp32 original.",
        "",
        "`cleanup,fuse` against onnxruntime's transformer optimizer, both timed in the same rounds (per round, "
        "ORT optimizer's block median / fuse's; above 1, fuse is faster):",
        "",
    ]
    for r in results:
        if "fuse_vs_ort_optimizer" in r:
            versus = r["fuse_vs_ort_optimizer"]
            low, high = versus["speedup_iqr"]
            lines.append(f"- {r['model']}: {versus['speedup']:.3f}x (IQR {low:.3f} .. {high:.3f})")
    lines += [
        "",
        "Ops that fusion made (op types absent from the original, with counts):",
        "",
    ]
    for r in results:
        for name, v in r["variants"].items():
            if name != "original":
                made = ", ".join(f"{op} {n}" for op, n in v["new_ops"].items()) or "none"
                lines.append(f"- {r['model']}, {name}: {made}")
    lines += ["", "Passes (`cleanup,fuse`, counters of the rewrites):", ""]
    for r in results:
        for p in r["fuse"]["passes"]:
            counters = ", ".join(f"{k}={v}" for k, v in p["stats"].items() if v) or "-"
            reason = f"; reason: {p['error']}" if p["error"] else ""
            lines.append(f"- {r['model']}: {p['name']} {p['status']} in {p['seconds']:.2f} s ({counters}){reason}")
        lines.append(
            f"- {r['model']}: error of the fused model vs the original: {r['fuse']['max_rel_error_random_inputs']:.2g} "
            f"(random inputs), {r['fuse']['max_rel_error_timing_input']:.2g} (timing input)"
        )
        if r["ort_optimizer"]:
            stats = ", ".join(f"{k} {v}" for k, v in r["ort_optimizer"]["fused_operator_statistics"].items())
            lines.append(f"- {r['model']}: ORT optimizer `{r['ort_optimizer']['call']}` reported: {stats or 'nothing'}")
    lines += ["", "Models:", ""]
    lines += [
        f"- {r['model']}: {r['origin']}; load average when it started {r['load_average_1min_at_start']}"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def _quantization_cell(q: dict) -> str:
    if q["quantize_dynamic"] == "failed":
        return f"failed: {q['error'][:80]}"
    if not q["runs"]:
        return f"{q['quantize_dynamic']}; result fails: {q['error'][:80]}"
    ops = sum(n for op, n in q["quantized_ops"].items() if op not in ("DynamicQuantizeLinear",))
    return f"{q['quantize_dynamic']}, {ops} int8 ops, cosine {q['min_cosine_vs_original']:.4f}"


def _is_int8_op(op: str) -> bool:
    """MatMulInteger, ConvInteger, QAttention, QGemm, DynamicQuantizeMatMul, DynamicQuantizeLinear, ..."""
    name = op.rsplit(".", 1)[-1]
    return "Integer" in name or name.startswith(("Q", "DynamicQuantize"))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's tools log warnings and print progress; keep the benchmark's output readable."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter blocks (a smoke run)")
    parser.add_argument("--blocks", type=int, help="rounds of timed blocks per model (default 20, quick 4)")
    parser.add_argument("--block-seconds", type=float, help="length of a block (default 0.2 s, quick 0.1 s)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument("--models", help="comma-separated subset of: cnn, encoder, bert")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default results/)")
    args = parser.parse_args(argv)
    onnxruntime.set_default_logger_severity(3)
    timing = Timing(
        blocks=args.blocks or (4 if args.quick else 20),
        block_s=args.block_seconds or (0.1 if args.quick else 0.2),
        min_runs=2 if args.quick else 3,
        warmup=3,
    )
    selected = cases()
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        selected = [c for c in selected if c.name in wanted]
    run = BenchmarkRun()
    with tempfile.TemporaryDirectory(prefix="bench-fusion-") as tmp:
        results = [bench_case(case, timing, args.threads, Path(tmp)) for case in selected]
    fields = {
        "passes": PASSES,
        "blocks": timing.blocks,
        "block_seconds": timing.block_s,
        "min_runs_per_block": timing.min_runs,
        "warmup_runs": timing.warmup,
        "threads": args.threads or "onnxruntime default",
        "description": (
            f"onnxruntime CPU, graph optimization level all for every variant, intra-op threads "
            f"{args.threads or 'default'}, thread spinning off, {timing.blocks} rounds of interleaved blocks "
            f"(original, fuse, ORT optimizer, original, ...) of the same number of runs, each block at least "
            f"{timing.block_s} s of the original (and {timing.min_runs} runs); one input, the same for all variants; "
            "batch 1."
        ),
    }
    run.write(args.out, "fusion", args.quick, fields, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
