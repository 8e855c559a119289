"""The `quant` pass: int8 or int4 weights, and int8 activations where it pays, chosen by measuring the target."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.observe import run_model
from onnxforge.calibration.recovery import refittable
from onnxforge.calibration.statistics import input_moments
from onnxforge.comparison import Comparison, compare_outputs
from onnxforge.data import Sample
from onnxforge.errors import PassError, PassUsageError
from onnxforge.ir import Model
from onnxforge.ir.layers import Layer
from onnxforge.pipeline.base import LayerDecision, Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.acceptance import Acceptance
from onnxforge.passes.cleanup.opset_upgrade import upgraded
from onnxforge.passes.quantization.exposing import (
    constant_node_weights,
    split_attention_projections,
    split_conv_silu,
    split_gemms,
)
from onnxforge.passes.quantization.activations import static_activations
from onnxforge.passes.quantization.by_region import (
    RegionOutcome,
    quantize_by_regions,
    timed_against_layer_types,
)
from onnxforge.passes.quantization.candidates import CandidateBuilder, WeightQuantizer, model_nodes, numbered_layers
from onnxforge.passes.quantization.choice import (
    GentlerVerdict,
    MeasuredChoice,
    choose_attention_form,
    choose_by_measurement,
    gentler_verdict,
    refine_by_float_prefix,
)
from onnxforge.passes.layers import excluded_by, half_precision_note
from onnxforge.passes.quantization.quantized_ops import quantized_ops
from onnxforge.passes.quantization.rewrite import ActivationQuantization, LayerFormat, quantized_output
from onnxforge.passes.quantization.sensitivity import RANKING_SAMPLES, BudgetFit, fit_error_budget
from onnxforge.pipeline.budget import Budget
from onnxforge.passes.quantization.weights import QuantSpec
from onnxforge.pipeline.registry import register_pass
from onnxforge.pipeline.runtime import Runtime
from onnxforge.pipeline.tunables import Choice, SearchTarget, Subset, Tunable

# Layer types each mode can quantize; embedding tables (Gather) are weight-only int8 rows in every mode.
MODE_OPS = {
    "dynamic": ("MatMul", "Conv", "Gather", "LSTM", "GRU"),
    "static": ("MatMul", "Conv", "Gather", "LSTM", "GRU"),
    "weight-only": ("MatMul", "Gather", "GRU"),
}
# Layer types whose activations stay float in every mode (LSTM's kernel quantizes its inputs itself).
WEIGHT_ONLY_TYPES = ("Gather", "LSTM", "GRU")
# Layer types each mode writes as operators in the qoperator form; other layers are written QDQ in it too
# (onnxruntime has no dynamic Conv kernel to write, and fuses a static QDQ MatMul into QLinearMatMul itself).
QOPERATOR_OPS = {"dynamic": ("MatMul",), "static": ("Conv",), "weight-only": ("MatMul",)}
PER_CHANNEL_INT8 = QuantSpec(bits=8, signed=True, symmetric=True, granularity="per-channel")
GENTLER_MATMUL = LayerFormat("weight-only", "qoperator", QuantSpec(8, True, True, "block", 128), accuracy_level=4)
EMBEDDING_INT4_SPEC = QuantSpec(bits=4, signed=True, symmetric=True, granularity="block", block_size=32)
# Layer types quantized for size unless the model gets slower than this: an embedding's lookup costs next to
# nothing, and a recurrent layer's speed at small sizes is a tie within noise while its weights are most of the file.
SIZE_FIRST_TYPES = ("Gather", "LSTM", "GRU")
SIZE_FIRST_MIN_SPEEDUP = 0.98
# DequantizeLinear takes an axis (one scale per channel) from this opset; below it, weights written as
# DequantizeLinear are quantized per tensor (operators such as DynamicQuantizeMatMul keep one scale per column).
PER_AXIS_MIN_OPSET = 13
_BLOCK = re.compile(r"^block:(\d+)$")
# The com.microsoft ops quantized layers become on a backend that runs them all.
QUANTIZED_CONTRIB_OPS = ("DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "GatherBlockQuantized", "MatMulNBits")


@register_pass("quant")
class Quantize(Pass):
    """Quantize weights to int8/int4 (and activations where it pays), keeping only what the target runs faster.

    mode: dynamic (activations quantized at run time), static (calibrated on --data) or weight-only
    (int4/int8 MatMul weights, MatMulNBits on onnxruntime); auto is weight-only for 4 bits, else dynamic,
    with Conv layers static when --data is given.
    With measure=true (the default) each layer type is timed on the pass's backend in each candidate
    format and stays float unless it gets faster by min_speedup. With data, the most sensitive layers stay float
    until the held-out error is within max_error and min_cosine, or without them, within the pass's share of the
    run's error budget; a gentler format is tried first where it runs faster than float. On onnxruntime an int8
    attention projection becomes QAttention where timing says it runs faster.
    With regions=true, --data and onnxruntime, static Conv layers are also tried in int8 regions (Conv with the Add,
    Concat, Mul, Sigmoid, pooling, Resize and reshaping ops around it, int8 end to end); timing keeps the regions or
    the per-type plan, whichever runs faster (with measure=false, the regions). A model below opset 13 is moved to
    opset 13 first where its layers would take one weight scale per channel (DequantizeLinear's axis); the note
    says so.
    """

    lossless = False

    @dataclass
    class Options:
        bits: int = 8
        mode: Literal["auto", "dynamic", "static", "weight-only"] = "auto"
        granularity: str = "auto"  # per-channel, per-tensor or block:N
        symmetric: bool = True
        format: Literal["auto", "qdq", "qoperator"] = "auto"
        exclude: list[str] = field(default_factory=list)  # op types, node names or name patterns
        calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
        percentile: float = 99.999
        weight_method: Literal["rtn", "search", "gptq", "adaround"] = "rtn"
        measure: bool = True
        float_prefix: bool = False  # after the per-type choice, time the first layers back in float
        min_speedup: float = 1.02
        regions: bool = True
        max_error: float | None = None
        min_cosine: float | None = None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        already = quantized_ops(model.graphs())
        if already:
            note = f"the model is quantized already ({', '.join(sorted(already))}); left alone"
            return PassResult(False, stats={"already_quantized": True}, notes=[note])
        if model.graph.opset < PER_AXIS_MIN_OPSET and self._takes_per_axis(model, ctx):
            return self._at_per_axis_opset(model, ctx)
        return self._quantize(model, ctx)

    def _quantize(self, model: Model, ctx: PassContext) -> PassResult:
        contrib_ops = runs_quantized_contrib_ops(ctx)
        fmt = resolve_format(self.options, model.graph.opset, contrib_ops)
        budget = self._budget(ctx)
        self._check_data(fmt, ctx.calibration)
        work = exposed_copy(model)
        layers = numbered_layers(work)
        nodes = model_nodes(work)
        in_body = {index: nodes[index][0].name for index in layers if nodes[index][0] is not work.graph}
        calibration = ctx.calibration
        has_data = bool(calibration.samples)
        plan, notes = self._initial_plan(layers, fmt, contrib_ops, has_data=has_data, in_body=in_body)
        plan, opset_note = per_tensor_below_per_axis_opset(plan, layers, work.graph.opset)
        convs = self._region_convs(plan, layers, in_body, contrib_ops, has_data)
        static_conv_format = plan[next(iter(convs))] if convs else None
        calibration_samples, held_out = calibration.split()
        static = [layers[i] for i, layer_fmt in plan.items() if layer_fmt.mode == "static"]
        main_graph_layers = [layers[i] for i in plan if i not in in_body]
        builder = CandidateBuilder(
            work,
            self._weight_quantizer(work, main_graph_layers, calibration_samples, calibration),
            self._calibrate(work, static, calibration_samples, calibration) if static else {},
            contrib_ops,
            ctx.runtime.capabilities.seven_bit_int8_weights,
        )
        feed = ctx.runtime.feed(model) if self.options.measure else {}  # only timing runs the model on it
        lines: list[str] = [opset_note] if opset_note else []
        if plan and self.options.measure:
            plan = self._measured_plan(builder, plan, layers, fmt, ctx, feed, notes, lines)
        # Regions first: when they win, they fit the budget themselves (their first or last tensors left float),
        # and a per-layer fit of the plan they replace would be wasted. The per-type plan they are timed against
        # is not fitted yet; fitting only slows a plan, so regions that beat it beat the fitted one too.
        regional = None
        if convs and work.graph.opset >= PER_AXIS_MIN_OPSET:
            o = self.options
            regional = quantize_by_regions(
                builder, plan, convs, static_conv_format, ctx, feed, budget, calibration, o.calibration, o.percentile,
                o.min_speedup, timed=o.measure,
            )
            lines += regional.lines if regional is not None else []
        sensitivity: dict[int, float] = {}  # measured by the error budget's fit, when it had to move layers
        measured = ""
        if not _regions_chosen(regional) and plan and budget is not None and has_data:
            gentler = gentler_formats(plan, layers, contrib_ops)
            verdict = GentlerVerdict()
            pays = gentler_verdict(builder, plan, ctx, feed, self.options.min_speedup, verdict)
            fit = fit_error_budget(builder, plan, budget, calibration, gentler, pays if self.options.measure else None)
            lines += _gentler_lines(verdict, gentler, layers, ctx)
            if regional is not None and regional.plan and fit.plan != plan and self.options.measure:
                regional = timed_against_layer_types(
                    regional, builder, fit.plan, ctx, feed, self.options.min_speedup, "the per-type plan fitted",
                    "int8 regions or layer types (the per-type plan fitted)",
                )
                lines.append(regional.lines[-1])
            if not _regions_chosen(regional):
                notes.update(_budget_notes(fit, budget, layers, ctx))
                plan, sensitivity = fit.plan, fit.sensitivity
                measured = (f"share of the budget ({budget.describe()}) spent with only this layer quantized, on "
                            f"{len(calibration_samples[:RANKING_SAMPLES])} calibration samples")
        if _regions_chosen(regional):
            plan = regional.layer_plan
            notes.update(_region_notes(regional, convs, ctx))
        for index, layer_fmt in plan.items():
            notes.setdefault(index, f"quantized: {_describe(layers[index], layer_fmt, ctx)}")
        stats: dict = {"layers": len(layers), "layers_quantized": len(plan), "layers_float": len(layers) - len(plan)}
        if in_body:
            stats["layers_in_subgraphs"] = len(in_body)
            stats["layers_quantized_in_subgraphs"] = len(in_body.keys() & plan.keys())
        if ctx.replayed_decisions():
            stats["decisions_replayed"] = ctx.replayed_decisions()
        lines += [f"{layers[i].op} {layers[i].name}{_located(i, in_body)}: {notes[i]}" for i in sorted(notes)]
        lines += half_precision_note(work.graph, "quant")
        decisions = [
            _layer_decision(layers[i], _located(i, in_body), plan.get(i), notes[i], ctx, sensitivity.get(i), measured)
            for i in sorted(notes)
        ]
        if not plan:
            lines.append("nothing quantized: the model is left as it was")
            return PassResult(False, stats=stats, notes=lines, layers=decisions)
        if builder.seven_bit_weights:
            lines.append(
                "int8 weights of integer kernels kept to 7 bits: this CPU's uint8 x int8 kernels (x86 without VNNI) "
                "add products in 16 bits and would overflow with 8"
            )
        quantized = regional.build() if regional and regional.chosen else builder.build(plan)
        if self.options.measure and contrib_ops:
            quantized, attention_line = choose_attention_form(quantized, ctx, feed, self.options.min_speedup)
            lines += [attention_line] if attention_line else []
        if held_out:
            error = compare_outputs(run_model(model, held_out, calibration), run_model(quantized, held_out, calibration))
            stats.update(held_out_max_rel_error=error.max_rel, held_out_min_cosine=error.min_cosine)
            lines.append(f"error on {len(held_out)} held-out samples: {_describe_error(error)}")
        model.graph = quantized.graph
        return PassResult(True, stats=stats, notes=lines, layers=decisions)

    @classmethod
    def search_space(cls, model: Model, where: SearchTarget) -> dict[str, Tunable] | None:
        """bits (4 too where MatMul layers take 4-bit weights), a float prefix, and which layer types stay float
        (`exclude`, where two types or more are quantized); with --data and Conv layers (static under mode=auto),
        their calibration, and mode=dynamic instead unless 4 bits are offered. None for a model quantized already
        or without a layer quant takes on `where`'s backend."""
        if quantized_ops(model.graphs()):
            return None
        contrib_ops = Runtime(where.backend, where.target).capabilities.runs_contrib_ops(*QUANTIZED_CONTRIB_OPS)
        layers = list(numbered_layers(exposed_copy(model)).values())
        int8, int4 = (cls(bits=bits)._quantized_types(layers, model.graph.opset, contrib_ops) for bits in (8, 4))
        if not int8:
            return None
        space: dict[str, Tunable] = {"bits": Choice((8, 4) if "MatMul" in int4 else (8,))}
        if where.has_data and "Conv" in int8:
            space["calibration"] = Choice(("minmax", "percentile", "entropy"))
            if "MatMul" not in int4:  # 4-bit weights are weight-only: bits=4 with mode=dynamic cannot run
                space["mode"] = Choice(("auto", "dynamic"))
        space["float_prefix"] = Choice((False, True))
        if len(int8) > 1:
            space["exclude"] = Subset(tuple(sorted(int8)))
        return space

    def acceptance(self) -> Acceptance | None:
        """With measure=true, the quantized model must not be slower than float as a whole (nor than min_speedup,
        when that is below 1: a size-first choice)."""
        if not self.options.measure:
            return None
        too_slow = "slower than float as a whole: the model is left as it was"
        return Acceptance(min_speedup=min(1.0, self.options.min_speedup), baseline="float", too_slow=too_slow)

    def _initial_plan(
        self, layers: dict[int, Layer], fmt: LayerFormat, contrib_ops: bool, has_data: bool, in_body: dict[int, str]
    ) -> tuple[dict[int, LayerFormat], dict[int, str]]:
        """Every layer the options allow, in the format its type takes; why each other layer stays float.

        With mode=auto and sample data, Conv layers of the main graph are quantized static (the form integer Conv
        kernels are fast in) while MatMuls stay dynamic (which keeps transformers accurate). Layers in subgraphs
        (`in_body`) are never static: calibration cannot observe their activations.
        """
        plan, notes = {}, {}
        for index, layer in layers.items():
            reason = self._reason_to_skip(layer, fmt, contrib_ops, index in in_body)
            if reason:
                notes[index] = f"kept float: {reason}"
            elif layer.op == "Gather":
                plan[index] = embedding_format(fmt, contrib_ops)
            elif layer.op == "LSTM":  # weights only: the kernel quantizes its inputs at run time
                plan[index] = LayerFormat("dynamic", "qoperator", PER_CHANNEL_INT8)
            elif layer.op == "GRU":  # no integer kernel: int8 storage, dequantized before the float op
                plan[index] = LayerFormat("weight-only", "qdq", PER_CHANNEL_INT8)
            else:
                mode = fmt.mode
                static_conv = layer.op == "Conv" and self.options.mode == "auto" and has_data and mode == "dynamic"
                if static_conv and index not in in_body:
                    mode = "static"
                form = fmt.form if layer.op in QOPERATOR_OPS[mode] else "qdq"
                plan[index] = dataclasses.replace(fmt, mode=mode, form=form)
        return plan, notes

    def _measured_plan(
        self,
        builder: CandidateBuilder,
        plan: dict[int, LayerFormat],
        layers: dict[int, Layer],
        fmt: LayerFormat,
        ctx: PassContext,
        feed: dict,
        notes: dict[int, str],
        lines: list[str],
    ) -> dict[int, LayerFormat]:
        """The plan timing keeps (per layer type, then optionally a float prefix); notes and lines say why."""
        min_speedup = self.options.min_speedup
        thresholds = {op: min(min_speedup, SIZE_FIRST_MIN_SPEEDUP) for op in SIZE_FIRST_TYPES}
        choice = choose_by_measurement(builder, plan, self._candidates(fmt, ctx), ctx, feed, min_speedup, thresholds)
        type_lines, measured_notes = _measurement_notes(choice, layers, ctx, min_speedup, thresholds)
        lines += type_lines
        notes.update(measured_notes)
        plan = choice.plan
        if plan and self.options.float_prefix:
            refined = refine_by_float_prefix(builder, plan, ctx, feed, min_gain=min_speedup)
            if refined.replayed_from:
                kept = len(refined.kept_float)
                lines.append(f"float prefix of {kept} layers as {refined.replayed_from} records, not timed")
            else:
                tried = ", ".join(f"first {k}: {s:.2f}x" for k, s in refined.tried.items())
                lines.append(f"float prefixes timed against the plan ({tried or 'none: too few layers'})")
                if refined.again:
                    again = ", ".join(f"first {k}: {s:.2f}x" for k, s in refined.again.items())
                    lines.append(f"timed again, a prefix kept only if both reach {min_speedup:g}x: {again}")
            for index in refined.kept_float:
                ran = f"ran {refined.speedup:.2f}x as fast" if refined.speedup else "was recorded faster"
                notes[index] = (
                    f"kept float: one of the first {len(refined.kept_float)} layers, which {ran} "
                    "in float with the rest quantized"
                )
            plan = refined.plan
        return plan

    def _takes_per_axis(self, model: Model, ctx: PassContext) -> bool:
        """Whether these options, at opset 13, quantize a layer of `model` with one weight scale per channel
        behind a DequantizeLinear (which takes that axis from opset 13)."""
        contrib_ops = runs_quantized_contrib_ops(ctx)
        try:
            fmt = resolve_format(self.options, PER_AXIS_MIN_OPSET, contrib_ops)
        except PassError:
            return False
        layers = numbered_layers(exposed_copy(model))
        plan, _ = self._initial_plan(layers, fmt, contrib_ops, bool(ctx.calibration.samples), in_body={})
        return any(
            layer_fmt.spec.granularity == "per-channel" and writes_dequantize_linear(layers[index], layer_fmt)
            for index, layer_fmt in plan.items()
        )

    def _at_per_axis_opset(self, model: Model, ctx: PassContext) -> PassResult:
        """Quantize a copy of `model` moved to opset 13, and take it when the pass changed it; where onnx's version
        converter cannot move the model, quantize it at its own opset (per-tensor weights, as the note says)."""
        opset = model.graph.opset
        try:
            moved = upgraded(model, PER_AXIS_MIN_OPSET)
        except PassError as error:
            result = self._quantize(model, ctx)
            result.notes.insert(0, f"kept at opset {opset}: {error}")
            return result
        result = self._quantize(moved, ctx)
        if result.changed:
            model.graph, model.header = moved.graph, moved.header
            result.notes.insert(0, f"moved from opset {opset} to {PER_AXIS_MIN_OPSET} (onnx's version converter) for "
                                   "one weight scale per channel (DequantizeLinear's axis)")
            result.stats.update(opset_from=opset, opset_to=PER_AXIS_MIN_OPSET)
        return result

    def _region_convs(
        self, plan: dict[int, LayerFormat], layers: dict[int, Layer], in_body: dict, contrib_ops: bool, has_data: bool
    ) -> dict[int, Layer]:
        """The static Conv layers of the main graph that int8 regions may take: with regions=true, 8 bits, sample
        data, and a backend that runs onnxruntime's int8 kernels; {} otherwise."""
        o = self.options
        if not (o.regions and has_data and contrib_ops and o.bits == 8):
            return {}
        return {
            index: layers[index]
            for index, fmt in plan.items()
            if fmt.mode == "static" and layers[index].op == "Conv" and index not in in_body
        }

    def _budget(self, ctx: PassContext) -> Budget | None:
        """The bounds the held-out error must keep: max_error and min_cosine when given, else the pass's share of
        the run's error budget (None: no bound)."""
        o = self.options
        if o.max_error is None and o.min_cosine is None:
            return ctx.budget.budget if ctx.budget is not None else None
        bounds = {"rel": o.max_error, "cosine": None if o.min_cosine is None else 1 - o.min_cosine}
        return Budget({key: value for key, value in bounds.items() if value is not None})

    def _check_data(self, fmt: LayerFormat, calibration: Calibration) -> None:
        needs = []
        if fmt.mode == "static":
            needs.append("static quantization calibrates activations on samples")
        if self.options.weight_method in ("gptq", "adaround"):
            needs.append(f"weight_method={self.options.weight_method} fits weights to calibration activations")
        if self.options.max_error is not None or self.options.min_cosine is not None:
            needs.append("max_error and min_cosine are judged on samples")
        if needs and not calibration.samples:
            raise PassUsageError(f"quant: {needs[0]}: give sample inputs with --data (data= in the Python API)")

    def _quantized_types(self, layers: list[Layer], opset: int, contrib_ops: bool) -> set[str]:
        """The op types of `layers` these options quantize before any timing; none where the model's opset cannot
        take them."""
        try:
            fmt = resolve_format(self.options, opset, contrib_ops)
        except PassError:
            return set()
        return {layer.op for layer in layers if not self._reason_to_skip(layer, fmt, contrib_ops, in_body=False)}

    def _reason_to_skip(self, layer: Layer, fmt: LayerFormat, contrib_ops: bool, in_body: bool) -> str:
        pattern = excluded_by(layer.op, layer.name, self.options.exclude)
        if pattern is not None:
            return f"excluded by exclude={pattern}"
        if layer.op not in MODE_OPS[fmt.mode]:
            return f"{fmt.mode} quantization applies to {', '.join(MODE_OPS[fmt.mode])} layers only"
        if in_body and fmt.mode == "static" and layer.op not in WEIGHT_ONLY_TYPES:
            return (
                "static quantization calibrates activations, and calibration reads values of the main graph only "
                "(one inside an If/Loop body is no model output); mode=dynamic quantizes it"
            )
        if layer.op == "LSTM" and not contrib_ops:
            return "int8 LSTM needs onnxruntime's DynamicQuantizeLSTM (backend ort)"
        weight_shape = layer.weight.shape
        if fmt.spec.granularity == "block" and layer.op == "MatMul" and weight_shape[0] < fmt.spec.block_size:
            return f"its weight has {weight_shape[0]} input features, fewer than a block ({fmt.spec.block_size})"
        return ""

    def _candidates(self, fmt: LayerFormat, ctx: PassContext) -> dict[str, list[LayerFormat]]:
        """Formats to time per layer type: MatMulNBits at both of its compute types, otherwise `fmt` alone."""
        if fmt.mode == "weight-only" and fmt.form == "qoperator" and runs_quantized_contrib_ops(ctx):
            return {"MatMul": [fmt, LayerFormat(fmt.mode, fmt.form, fmt.spec, accuracy_level=0)]}
        return {}

    def _calibrate(
        self, model: Model, layers: list[Layer], samples: list[Sample], calibration: Calibration
    ) -> dict[str, ActivationQuantization]:
        names = sorted({t.name for layer in layers for t in (layer.activation, quantized_output(layer))})
        return static_activations(model, names, samples, calibration, self.options.calibration, self.options.percentile)

    def _weight_quantizer(
        self, model: Model, layers: list[Layer], samples: list[Sample], calibration: Calibration
    ) -> WeightQuantizer:
        """Quantizes weights by `weight_method`; for gptq, adaround and search, with the second moments of what each
        MatMul (and for adaround each refittable Conv: its input patches) reads on `samples` (GPTQ's Hessian XᵀX over
        every row, and its diagonal per row), by weight name."""
        method = self.options.weight_method
        if method == "rtn" or not samples:
            return WeightQuantizer(method)
        ops = ("MatMul", "Conv") if method == "adaround" else ("MatMul",)
        fitted = [layer for layer in layers if layer.op in ops and refittable(layer.node)]
        readers: dict[str, Layer] = {}  # one MatMul per input: those reading the same input read the same rows
        for layer in fitted:
            readers.setdefault(_rows_read(layer), layer)
        moments = dict(zip(readers, input_moments(model, list(readers.values()), samples, calibration)))
        hessians: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for layer in fitted:
            moment, weight = moments[_rows_read(layer)], layer.weight.name
            hessians[weight] = hessians.get(weight, 0) + moment.gram
            counts[weight] = counts.get(weight, 0) + moment.rows
        energy = {name: np.diag(h) / max(counts[name], 1) for name, h in hessians.items()}
        return WeightQuantizer(method, hessians=hessians, input_energy=energy)


def exposed_copy(model: Model) -> Model:
    """A copy of `model` with the weights quant takes exposed in every graph: Constant-node weights as constants,
    fused attention projections as MatMuls, Gemms as MatMul (+ Add); and SiLUs after Conv layers as Sigmoid and Mul,
    which int8 regions take."""
    work = model.copy()
    for graph in list(work.graphs()):
        constant_node_weights(graph)
        split_attention_projections(graph)
        split_gemms(graph)
        split_conv_silu(graph)
    return work


def _rows_read(layer: Layer) -> str:
    """What names the rows a layer reads: a MatMul's input (every MatMul of it reads the same rows), a Conv itself
    (its patches depend on its kernel)."""
    return layer.activation.name if layer.op == "MatMul" else f"{layer.op} {layer.name}"


def runs_quantized_contrib_ops(ctx: PassContext) -> bool:
    """Whether the backend runs the onnxruntime contrib ops quantized layers may become; without them, layers are
    written in standard ONNX ops only."""
    return ctx.runtime.capabilities.runs_contrib_ops(*QUANTIZED_CONTRIB_OPS)


def resolve_format(options: Quantize.Options, opset: int, contrib_ops: bool) -> LayerFormat:
    """The layer format the options ask for, 'auto' resolved; PassUsageError for combinations that cannot work,
    PassError where the model's opset is too old for them."""
    bits = options.bits
    if bits not in (4, 8):
        raise PassUsageError(f"quant:bits={bits} is not supported: choose 8 or 4")
    mode = options.mode if options.mode != "auto" else ("weight-only" if bits == 4 else "dynamic")
    if bits == 4 and mode != "weight-only":
        raise PassUsageError(f"quant: 4-bit {mode} quantization has no kernels: use bits=4 with mode=weight-only")
    form = options.format
    if form == "auto":
        # onnxruntime 1.32 does not fuse a dynamic QDQ MatMul followed by Relu: write its kernel directly. A static
        # Conv is written as the QLinearConv onnxruntime fuses its QDQ group into: the same kernel, a smaller file.
        form = "qoperator" if contrib_ops else "qdq"
    granularity, block_size = _granularity(options.granularity, bits, mode, form, contrib_ops)
    spec = QuantSpec(bits, signed=True, symmetric=options.symmetric, granularity=granularity, block_size=block_size)
    # Static activations are QuantizeLinear/DequantizeLinear in either form.
    qdq = form == "qdq" or mode == "static"
    per_axis_asked = granularity == "per-channel" and options.granularity != "auto"
    if (granularity == "block" or bits == 4) and form == "qdq":
        needed = 21
    elif qdq and per_axis_asked:
        needed = PER_AXIS_MIN_OPSET
    else:  # DynamicQuantizeLinear; per-channel weights in QDQ become per-tensor below PER_AXIS_MIN_OPSET
        needed = 11
    if opset < needed:
        instead = "format=qoperator or " if form == "qdq" and mode != "static" else ""
        raise PassError(
            f"quant: {spec.bits}-bit {granularity} weights in QDQ form need opset {needed}, the model has "
            f"opset {opset}; use {instead}a model exported at opset {needed} or later (upgrade-opset:to={needed})"
        )
    return LayerFormat(mode, form, spec)


def per_tensor_below_per_axis_opset(
    plan: dict[int, LayerFormat], layers: dict[int, Layer], opset: int
) -> tuple[dict[int, LayerFormat], str]:
    """The plan with per-channel weights written as DequantizeLinear made per tensor where the opset has no
    per-axis DequantizeLinear, and a note saying which layers (empty when none)."""
    if opset >= PER_AXIS_MIN_OPSET:
        return plan, ""
    changed = {
        index: dataclasses.replace(fmt, spec=dataclasses.replace(fmt.spec, granularity="per-tensor"))
        for index, fmt in plan.items()
        if fmt.spec.granularity == "per-channel" and writes_dequantize_linear(layers[index], fmt)
    }
    if not changed:
        return plan, ""
    ops = ", ".join(sorted({layers[index].op for index in changed}))
    note = (
        f"opset {opset} has no per-channel DequantizeLinear (opset {PER_AXIS_MIN_OPSET}): {len(changed)} {ops} "
        f"layers get one weight scale per tensor; upgrade-opset:to={PER_AXIS_MIN_OPSET} first for one per channel"
    )
    return {**plan, **changed}, note


def writes_dequantize_linear(layer: Layer, fmt: LayerFormat) -> bool:
    """Whether `layer` quantized as `fmt` stores its weight behind a DequantizeLinear (QDQ, and static Conv,
    whose group stays QDQ where onnxruntime would not fuse it)."""
    if layer.op in ("Gather", "LSTM"):
        return False
    return fmt.form == "qdq" or fmt.mode == "static"


def embedding_format(fmt: LayerFormat, contrib_ops: bool) -> LayerFormat:
    """How an embedding table is stored: int8 rows with a scale each, or for 4-bit on onnxruntime int4 blocks
    along each row, as large as the weights' blocks (GatherBlockQuantized)."""
    if fmt.spec.bits == 4 and contrib_ops:
        spec = dataclasses.replace(EMBEDDING_INT4_SPEC, block_size=fmt.spec.block_size)
        return LayerFormat("weight-only", "qoperator", spec)
    return LayerFormat("weight-only", "qdq", PER_CHANNEL_INT8)


def _granularity(text: str, bits: int, mode: str, form: str, contrib_ops: bool) -> tuple[str, int]:
    nbits = mode == "weight-only" and form == "qoperator" and contrib_ops
    if text == "auto":
        if bits == 4 or nbits:
            return "block", 32 if bits == 4 else 128
        return "per-channel", 0
    match = _BLOCK.match(text)
    if match:
        size = int(match.group(1))
        if size < 16 or size & (size - 1):
            raise PassUsageError(f"quant:granularity={text}: the block size must be a power of two, 16 or more")
        if mode != "weight-only":
            raise PassUsageError(f"quant:granularity={text}: block quantization is for mode=weight-only")
        return "block", size
    if text not in ("per-channel", "per-tensor"):
        raise PassUsageError(f"quant:granularity={text}: choose per-channel, per-tensor or block:N (N = 32, 64, ...)")
    if nbits:
        raise PassUsageError("quant: MatMulNBits quantizes in blocks: use granularity=block:N, or format=qdq")
    if bits == 4:
        raise PassUsageError("quant: 4-bit weights are quantized in blocks: use granularity=block:N (32, 64, 128)")
    return text, 0


def _located(index: int, in_body: dict[int, str]) -> str:
    """' (in subgraph NAME)' for a layer of an If/Loop/Scan body, '' for one of the main graph."""
    return f" (in subgraph {in_body[index]})" if index in in_body else ""


def _describe_error(error: Comparison) -> str:
    cosine = f", worst cosine {error.min_cosine:.5f}" if error.min_cosine is not None else ""
    return f"worst relative error {error.max_rel:.3g}{cosine}"


def _describe(layer: Layer, fmt: LayerFormat, ctx: PassContext) -> str:
    if layer.op == "Gather" and fmt.spec.bits == 4:
        return f"int4 rows in blocks of {fmt.spec.block_size}, GatherBlockQuantized (embedding table)"
    if layer.op == "Gather":
        return "int8 rows with one scale each (embedding table)"
    if layer.op == "LSTM":
        return "int8 W and R, one scale per gate column, DynamicQuantizeLSTM"
    if layer.op == "GRU":
        grain = "per tensor" if fmt.spec.granularity == "per-tensor" else "per gate row"
        return f"int8 W and R ({grain}) dequantized to a float GRU: onnxruntime has no int8 GRU kernel"
    return fmt.describe(contrib_ops=runs_quantized_contrib_ops(ctx))


def _layer_decision(
    layer: Layer,
    located: str,
    fmt: LayerFormat | None,
    note: str,
    ctx: PassContext,
    error: float | None,
    error_text: str,
) -> LayerDecision:
    """A layer's decision for the report: its format (None: float) and the reason its note gives, and the
    sensitivity the error budget measured for it, if it did."""
    if fmt is None:
        decision, why = "float", note.removeprefix("kept float: ")  # every float note of this pass starts so
    else:
        decision = _describe(layer, fmt, ctx)
        why = note.removeprefix(f"quantized: {decision}").removeprefix(": ")
    if error is None:
        return LayerDecision(f"{layer.op} {layer.name}{located}", decision, why)
    return LayerDecision(f"{layer.op} {layer.name}{located}", decision, why, float(error), error_text)


def _measurement_notes(
    choice: MeasuredChoice,
    layers: dict[int, Layer],
    ctx: PassContext,
    min_speedup: float,
    thresholds: dict[str, float],
) -> tuple[list[str], dict[int, str]]:
    """One line per layer type with its timings, and the reason for each layer measurement left float."""
    where = f"{ctx.runtime.backend}/{ctx.runtime.target}"
    lines, notes = [], {}
    for op, measured in choice.by_type.items():
        example = layers[measured.members[0]]
        needed = thresholds.get(op, min_speedup)
        if measured.chosen is not None:
            verdict = "quantized"
        elif op in choice.dropped_after_combining:
            verdict = "kept float: the whole model was slower than float with them quantized"
        else:
            verdict = f"kept float: below the required {needed:.2f}x (min_speedup)"
        if measured.replayed_from:
            chosen = f" as {_describe(example, measured.chosen, ctx)}" if measured.chosen else ""
            verdict = f"{verdict}{chosen}, as {measured.replayed_from} records, not timed"
            lines.append(f"{op} layers ({measured.layers}): {verdict}")
        else:
            timings = ", ".join(f"{s:.2f}x as {_describe(example, fmt, ctx)}" for fmt, s in measured.speedups)
            lines.append(f"{op} layers ({measured.layers}) measured {timings} against float on {where}: {verdict}")
        if measured.chosen is None:
            for index in measured.members:
                notes[index] = f"kept float: {op} layers were not faster quantized on {where}"
    return lines, notes


def _regions_chosen(regional: RegionOutcome | None) -> bool:
    return regional is not None and regional.chosen


def _region_notes(regional: RegionOutcome, convs: dict[int, Layer], ctx: PassContext) -> dict[int, str]:
    """Why each Conv layer the regions could take is int8 or float."""
    notes, layer_plan = {}, regional.layer_plan
    for index in convs:
        region = regional.region_of(index)
        if region is None:
            notes[index] = "kept float: in no int8 region (no op around it runs int8)"
        elif index in layer_plan:
            notes[index] = f"quantized: {_describe(convs[index], regional.plan[region], ctx)}: in int8 region {region}"
        elif region in regional.plan:
            notes[index] = f"kept float: in the tensors of int8 region {region} left float to meet the budget"
        else:
            notes[index] = f"kept float: its region {region} stayed float"
    return notes


def gentler_formats(
    plan: dict[int, LayerFormat], layers: dict[int, Layer], contrib_ops: bool
) -> dict[int, LayerFormat]:
    """Formats that lose less than dynamic int8, for the error budget to try before float.

    onnxruntime's MatMulNBits at accuracy level 4 quantizes the activations in blocks of the weight's block
    size along K instead of one scale per tensor, so an outlier channel spoils one block, not the whole row.
    """
    if not contrib_ops:
        return {}
    return {
        index: GENTLER_MATMUL
        for index, fmt in plan.items()
        if fmt.mode == "dynamic" and layers[index].op == "MatMul" and layers[index].weight.shape[0] >= 128
    }


def _gentler_lines(
    verdict: GentlerVerdict, gentler: dict[int, LayerFormat], layers: dict[int, Layer], ctx: PassContext
) -> list[str]:
    """What timing said of the gentler formats, when the error budget's fit asked."""
    if verdict.pays is None:
        return []
    first = next(iter(gentler))
    what = f"{len(gentler)} layers as {_describe(layers[first], gentler[first], ctx)}"
    if verdict.replayed_from:
        timed = f"as recorded in {verdict.replayed_from}, not timed"
    else:
        timed = f"timed {verdict.speedup:.2f}x against them in float"
    outcome = "offered to the most sensitive layers" if verdict.pays else "not faster: the most sensitive layers go to float"
    return [f"gentler format for the error budget, {what}: {timed}: {outcome}"]


def _budget_notes(fit: BudgetFit, budget: Budget, layers: dict[int, Layer], ctx: PassContext) -> dict[int, str]:
    limits = budget.describe()
    moved = len(fit.kept_float) + len(fit.gentler)
    why = {
        index: f"one of the {moved} most sensitive layers ({fit.sensitivity[index]:.3g}x the budget when quantized "
        "alone)"
        for index in [*fit.kept_float, *fit.gentler]
    }
    notes = {index: f"kept float: {why[index]}, left float to meet {limits}" for index in fit.kept_float}
    for index in fit.gentler:
        described = _describe(layers[index], fit.plan[index], ctx)
        notes[index] = f"quantized: {described}: {why[index]}, given finer activation blocks to meet {limits}"
    return notes
