"""The `lowrank` pass: factor large MatMul, Gemm and Conv weights into two thinner layers where that cuts work."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.probes import replacement_errors
from onnxforge.calibration.recovery import MAX_ROWS, layer_targets, refit_layers
from onnxforge.calibration.statistics import input_moments
from onnxforge.data import Sample
from onnxforge.errors import PassUsageError
from onnxforge.ir import Model, infer_shapes
from onnxforge.ir.edit import make_constant, unique_name
from onnxforge.ir.layers import Layer, LayerCost, describe_change, layer_costs
from onnxforge.pipeline.base import LayerDecision, Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.passes.layers import excluded_by, find_layers, half_precision_note
from onnxforge.passes.lowrank.factorization import Spectrum, ranks_for_budget, spectrum
from onnxforge.pipeline.registry import register_pass
from onnxforge.pipeline.acceptance import Acceptance
from onnxforge.pipeline.tunables import Choice, Interval, SearchTarget, Tunable

# A factorization must cut the layer's parameters (and so its multiply-accumulates) at least this much.
MAX_KEPT = 0.9
DEFAULT_ENERGY = 0.9  # when neither rank, energy nor ratio is given
# With ratio= and method=whitened, the model's output error is measured with each layer alone truncated to keep
# these fractions of its parameters.
PROBED = (0.1, 0.35, 0.7)
HELD_BACK = 8  # held-out samples at most that measure it


@dataclass
class Candidate:
    """A layer whose weight is seen as a matrix W [inputs, outputs] (x @ W), and its spectrum.

    A Conv's matrix is [C kh kw, O] ("channel": a k x k Conv of r filters, then a 1 x 1 Conv), or
    [C kh, O kw] ("spatial": a kh x 1 Conv of r filters, then a 1 x kw Conv).
    """

    layer: Layer
    matrix: np.ndarray
    spectrum: Spectrum | None = None
    second_moment: np.ndarray | None = None  # of its inputs on --data: XᵀX / rows
    form: str = "matrix"

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def worth_it(self, rank: int) -> bool:
        m, n = self.shape
        return rank * (m + n) <= MAX_KEPT * m * n

    def stored(self, matrix: np.ndarray) -> np.ndarray:
        """A matrix of this candidate's shape in the layout of the layer's weight."""
        if self.form == "spatial":
            out_channels, in_channels, kh, kw = self.layer.weight.shape
            return matrix.reshape(in_channels, kh, out_channels, kw).transpose(2, 0, 1, 3)
        return self.layer.stored(matrix)


@register_pass("lowrank")
class LowRank(Pass):
    """Replace MatMul, Gemm and Conv weights W by products A @ B of rank r, where r (m + n) < m n by a margin.

    A MatMul becomes two MatMuls, a Gemm two Gemms (the bias on the second), a k x k Conv a k x k Conv with r
    filters and a 1 x 1 Conv; grouped Convs stay. The rank comes from `rank`, from the singular-value
    `energy` each layer keeps, or from a global parameter budget `ratio` (what keeps the most energy per
    parameter). method=whitened (needs --data) factors the layer's outputs on the calibration inputs instead
    of its weight, and spends a `ratio` budget where the model's outputs, measured, lose least; recover=true
    then refits the second factor by least squares to the layer's old outputs.
    """

    lossless = False

    @dataclass
    class Options:
        rank: int = 0  # the rank of every factored layer (0: choose by energy or ratio)
        energy: float = 0.0  # keep this fraction of each layer's squared singular values
        ratio: float = 0.0  # keep this fraction of the factored layers' parameters, ranks chosen together
        method: Literal["svd", "whitened"] = "svd"
        min_size: int = 4096  # layers with fewer weights stay as they are
        exclude: list[str] = field(default_factory=list)  # op types, node names or name patterns
        recover: bool = False  # refit each second factor on --data to the layer's outputs before factoring
        measure: bool = True  # time the factored model against the one before on the pass's backend
        min_speedup: float = 1.0  # measured below this, the model is left as it was

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self._check_options(ctx.calibration)
        infer_shapes(model)
        candidates = [c for c in (as_candidate(layer) for layer in find_layers(model.graph)) if c is not None]
        candidates = [c for c in candidates if c.matrix.size >= self.options.min_size and not self._excluded(c)]
        calibration = ctx.calibration
        fit, held_out = calibration.split()
        if fit:
            moments = _second_moments(model, candidates, fit, calibration)
            for candidate, moment in zip(candidates, moments):
                candidate.second_moment = moment
        for candidate in candidates:
            whitening = candidate.second_moment if self.options.method == "whitened" else None
            candidate.spectrum = spectrum(candidate.matrix, whitening)
        by_output_error = bool(self.options.ratio) and self.options.method == "whitened"
        if by_output_error:
            ranks = self._ranks_by_output_error(model, candidates, calibration)
        else:
            ranks = self._ranks(candidates)
        if self.options.method == "svd" and not self.options.ratio:
            candidates, ranks = self._cheaper_conv_forms(candidates, ranks)
        chosen = [(c, r) for c, r in zip(candidates, ranks) if c.worth_it(r)]
        kept = [_kept_whole(c, r) for c, r in zip(candidates, ranks) if not c.worth_it(r)]
        notes, decisions = [note for note, _ in kept], [decision for _, decision in kept]
        stats = {"layers_considered": len(candidates), "layers_factored": len(chosen)}
        if by_output_error:
            notes.append(f"ranks chosen by the model's output error on {len(held_out[-HELD_BACK:])} held-out "
                         f"samples, each layer truncated alone at {len(PROBED)} ranks")
        notes += half_precision_note(model.graph, "lowrank")
        if not chosen:
            return PassResult(False, stats=stats, notes=notes or ["no layer large enough to factor"], layers=decisions)
        params_before, costs = model.stats().params, layer_costs(model.graph)
        nodes = [c.layer.node for c, _ in chosen]
        targets = layer_targets(model, nodes, fit, calibration) if self.options.recover else {}
        firsts = {id(c.layer.node): factor_layer(model, c, r) for c, r in chosen}
        infer_shapes(model)
        after = layer_costs(model.graph)
        for candidate, rank in chosen:
            node = candidate.layer.node
            before_cost, first_cost = costs[id(node)], after[id(firsts[id(node)])]
            combined = LayerCost(first_cost.params + after[id(node)].params, _sum_macs(first_cost, after[id(node)]))
            note, decision = _factored(candidate, rank, describe_change(before_cost, combined), len(fit))
            notes.append(note)
            decisions.append(decision)
        if self.options.recover:
            refitted = refit_layers(model, nodes, targets, fit, calibration)
            notes.append(f"recovery: {refitted} of {len(nodes)} second factors refitted on {len(fit)} samples")
        stats["params_removed"] = params_before - model.stats().params
        return PassResult(True, stats=stats, notes=notes, layers=decisions)

    @classmethod
    def search_space(cls, model: Model, where: SearchTarget) -> dict[str, Tunable] | None:
        """The parameter budget `ratio`; with --data, the whitened method too, and recovery always on. None without
        a MatMul, Gemm or Conv weight that the pass factors by default (min_size weights or more)."""
        min_size = cls.Options().min_size
        # The size first: as_candidate builds the weight's matrix.
        if not any(
            math.prod(layer.weight.shape) >= min_size and as_candidate(layer) is not None
            for layer in find_layers(model.graph)
        ):
            return None
        space: dict[str, Tunable] = {"ratio": Interval(0.3, 0.9, step=0.1)}
        if where.has_data:
            space.update(method=Choice(("svd", "whitened")), recover=Choice((True,)))
        return space

    def acceptance(self) -> Acceptance | None:
        """With measure=true, the factored model must be min_speedup faster than the one before."""
        if not self.options.measure:
            return None
        return Acceptance(min_speedup=self.options.min_speedup, zeroed=("params_removed",))

    def gentler(self) -> list[Pass]:
        """The pass keeping more, in 7 steps towards everything: of the parameters (ratio=) or of each layer's
        energy (energy=, also by default); none for a fixed rank=."""
        o = self.options
        if o.rank:
            return []
        if o.ratio:
            return [type(self)(replace(o, ratio=round(o.ratio + (1 - o.ratio) * k / 8, 6))) for k in range(1, 8)]
        energy = o.energy or DEFAULT_ENERGY
        return [type(self)(replace(o, energy=round(energy + (1 - energy) * k / 8, 6))) for k in range(1, 8)]

    def _check_options(self, calibration: Calibration) -> None:
        o = self.options
        given = [name for name, value in (("rank", o.rank), ("energy", o.energy), ("ratio", o.ratio)) if value]
        if len(given) > 1:
            raise PassUsageError(f"lowrank: give one of rank=, energy= and ratio=, not {' and '.join(given)}")
        if o.rank < 0 or not 0 <= o.energy <= 1 or not 0 <= o.ratio <= 1:
            raise PassUsageError("lowrank: rank= is a positive integer, energy= and ratio= fractions from 0 to 1")
        if (o.method == "whitened" or o.recover) and not calibration.samples:
            raise PassUsageError("lowrank: method=whitened and recover=true use sample inputs: give them with --data")

    def _ranks(self, candidates: list[Candidate]) -> list[int]:
        o = self.options
        if o.rank:
            return [min(o.rank, c.spectrum.full_rank) for c in candidates]
        if o.ratio:
            return ranks_for_budget([c.spectrum for c in candidates], [c.shape for c in candidates], o.ratio)
        return [c.spectrum.rank_for_energy(o.energy or DEFAULT_ENERGY) for c in candidates]

    def _ranks_by_output_error(self, model: Model, candidates: list[Candidate], calibration: Calibration) -> list[int]:
        """Ranks within the budget that lose the least of the model's outputs on --data.

        A layer's whitened spectrum gives its own output error at each rank; how much of it reaches the model's
        outputs is measured at a few ranks (PROBED fractions of its parameters), on held-out samples (at most
        HELD_BACK), which the whitening never saw, so that what it overfits shows: the model runs with that layer
        alone truncated. Between those ranks the ratio is interpolated, beyond them held.
        """
        if not candidates:
            return []
        check = calibration.split()[1][-HELD_BACK:]
        probed = [_probe_ranks(c) for c in candidates]
        truncated = [_truncated_weights(c, c.spectrum, ranks) for c, ranks in zip(candidates, probed)]
        errors = replacement_errors(model, [c.layer for c in candidates], truncated, check, calibration)
        worth = [_output_error_worth(c.spectrum, ranks, errs) for c, ranks, errs in zip(candidates, probed, errors)]
        shapes = [c.shape for c in candidates]
        return ranks_for_budget([c.spectrum for c in candidates], shapes, self.options.ratio, worth, MAX_KEPT)

    def _cheaper_conv_forms(self, candidates: list[Candidate], ranks: list[int]) -> tuple[list, list]:
        """Each k x k Conv in its spatial form where that is worth it, as faithful, and costs fewer
        multiply-accumulates."""
        forms, form_ranks = [], []
        for candidate, rank in zip(candidates, ranks):
            spatial = spatial_candidate(candidate)
            if spatial is not None:
                spatial_rank = self._ranks([spatial])[0]
                channel_cost, spatial_cost = conv_macs(candidate, rank), conv_macs(spatial, spatial_rank)
                cheaper = channel_cost is not None and spatial_cost is not None and spatial_cost < channel_cost
                # As faithful: at a fixed rank, as much weight energy as the channel form keeps; else the target's.
                needed = candidate.spectrum.energy(rank)
                if not self.options.rank:
                    needed = min(needed, self.options.energy or DEFAULT_ENERGY)
                faithful = spatial.spectrum.energy(spatial_rank) >= needed - 1e-9
                if spatial.worth_it(spatial_rank) and faithful and (cheaper or not candidate.worth_it(rank)):
                    candidate, rank = spatial, spatial_rank
            forms.append(candidate)
            form_ranks.append(rank)
        return forms, form_ranks

    def _excluded(self, candidate: Candidate) -> bool:
        return excluded_by(candidate.layer.op, candidate.layer.name, self.options.exclude) is not None


def as_candidate(layer: Layer) -> Candidate | None:
    """The layer's weight as x @ W (its matrix), for MatMul, Gemm (alpha 1) and ungrouped 2-D Convs."""
    attrs = layer.node.attrs
    if layer.op == "MatMul" or (layer.op == "Gemm" and attrs.get("alpha", 1.0) == 1.0):
        return Candidate(layer, layer.matrix())
    if layer.op == "Conv" and len(layer.weight.shape) == 4 and attrs.get("group", 1) == 1:
        return Candidate(layer, layer.matrix(), form="channel")
    return None


def spatial_candidate(candidate: Candidate) -> Candidate | None:
    """The spatial form of a k x k Conv (both sides above 1, explicit pads), with its plain spectrum."""
    node, weight = candidate.layer.node, np.asarray(candidate.layer.weight.values, np.float64)
    explicit = node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
    if candidate.form != "channel" or min(weight.shape[2:]) < 2 or not explicit:
        return None
    out_channels, in_channels, kh, kw = weight.shape
    matrix = weight.transpose(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)
    return Candidate(candidate.layer, matrix, spectrum(matrix), form="spatial")


def conv_macs(candidate: Candidate, rank: int) -> int | None:
    """Multiply-accumulates of a Conv candidate's two factors at `rank`; None where shapes are unknown."""
    node = candidate.layer.node
    data, output = node.inputs[0].shape, node.outputs[0].shape
    if data is None or output is None or not all(isinstance(d, int) for d in [*data, *output]):
        return None
    out_channels, in_channels, kh, kw = candidate.layer.weight.shape
    positions = output[0] * output[2] * output[3]
    if candidate.form == "channel":
        return rank * (in_channels * kh * kw + out_channels) * positions
    # The kh x 1 factor keeps the input's width (no horizontal stride or padding); the 1 x kw factor makes the rest.
    return rank * in_channels * kh * output[0] * output[2] * data[3] + out_channels * rank * kw * positions


def _second_moments(
    model: Model, candidates: list[Candidate], samples: list[Sample], calibration: Calibration
) -> list[np.ndarray]:
    """XᵀX / rows of each candidate's inputs over the samples (Conv: its input patches), at most MAX_ROWS rows at
    random positions in all; the rows are drawn input after input, in the order the candidates first read them."""
    by_input: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_input.setdefault(candidate.layer.activation.name, []).append(candidate)
    drawn = [candidate for readers in by_input.values() for candidate in readers]
    limit = max(MAX_ROWS // len(samples), 1)
    moments = input_moments(model, [c.layer for c in drawn], samples, calibration, rows_per_sample=limit)
    by_candidate = {id(candidate): moment.mean for candidate, moment in zip(drawn, moments)}
    return [by_candidate[id(candidate)] for candidate in candidates]


def _probe_ranks(candidate: Candidate) -> list[int]:
    m, n = candidate.shape
    return sorted({max(1, int(fraction * m * n / (m + n))) for fraction in PROBED})


def _truncated_weights(candidate: Candidate, spec: Spectrum, ranks: list[int]) -> Iterator[np.ndarray]:
    """The layer's weight truncated by `spec` at each rank, one at a time (they can be large)."""
    for rank in ranks:
        yield candidate.stored(np.matmul(*spec.factors(rank)))


def _output_error_worth(spec: Spectrum, ranks: list[int], errors: list[float]) -> np.ndarray:
    """What each singular value of `spec` is worth to the model's outputs: its squared value (the layer's output
    energy) times the model's error per unit of the layer's own at the probed ranks (by `spec`'s tails)."""
    tails = np.append(np.cumsum(spec.s[::-1] ** 2)[::-1], 0.0)
    floor = 1e-12 * max(float(tails[0]), 1e-300)
    ratios = [error / max(float(tails[rank]), floor) for rank, error in zip(ranks, errors)]
    return np.interp(np.arange(1, spec.full_rank + 1), ranks, ratios) * spec.s**2


def factor_layer(model: Model, candidate: Candidate, rank: int) -> gs.Node:
    """Insert the first factor before the layer and make the layer the second; return the first.

    The candidate's spectrum must be computed. Shapes are not inferred again here.
    """
    layer, node = candidate.layer, candidate.layer.node
    a, b = candidate.spectrum.factors(rank)
    a, b = a.astype(np.float32), b.astype(np.float32)
    x = layer.activation
    hidden = gs.Variable(unique_name(model.graph, f"{layer.name}_rank{rank}"))
    weight_name = layer.weight.name
    if candidate.form == "spatial":
        first = _factor_spatially(model, candidate, a, b, hidden)
    elif node.op == "Conv":
        kernel = layer.weight.shape
        first_weight = a.T.reshape(rank, *kernel[1:])
        first = gs.Node("Conv", inputs=[x, make_constant(model.graph, f"{weight_name}_first", first_weight)],
                        outputs=[hidden], attrs={k: v for k, v in node.attrs.items() if k != "kernel_shape"})
        node.attrs = {"group": 1}
        node.inputs[1] = make_constant(model.graph, f"{weight_name}_second", b.T.reshape(kernel[0], rank, 1, 1))
    else:
        op = "Gemm" if node.op == "Gemm" else "MatMul"
        first = gs.Node(op, inputs=[x, make_constant(model.graph, f"{weight_name}_first", a)], outputs=[hidden])
        node.inputs[1] = make_constant(model.graph, f"{weight_name}_second", layer.stored(b))
    first.name = unique_name(model.graph, f"{layer.name}_first")
    node.inputs[layer.activation_input] = hidden
    model.graph.nodes.append(first)
    model.graph.toposort()
    return first


def _factor_spatially(
    model: Model, candidate: Candidate, a: np.ndarray, b: np.ndarray, hidden: gs.Variable
) -> gs.Node:
    """The layer made the 1 x kw Conv (the horizontal stride, padding and dilation, the bias) after a new kh x 1
    Conv of r filters into `hidden` (the vertical ones), which is returned."""
    layer, node = candidate.layer, candidate.layer.node
    out_channels, in_channels, kh, kw = layer.weight.shape
    rank = a.shape[1]
    strides, dilations = node.attrs.get("strides", [1, 1]), node.attrs.get("dilations", [1, 1])
    top, left, bottom, right = node.attrs.get("pads", [0, 0, 0, 0])
    vertical = make_constant(model.graph, f"{layer.weight.name}_first", a.T.reshape(rank, in_channels, kh, 1))
    attrs = {"strides": [strides[0], 1], "dilations": [dilations[0], 1], "pads": [top, 0, bottom, 0]}
    first = gs.Node("Conv", inputs=[layer.activation, vertical], outputs=[hidden], attrs=attrs)
    horizontal = b.reshape(rank, out_channels, kw).transpose(1, 0, 2).reshape(out_channels, rank, 1, kw)
    node.attrs = {"strides": [1, strides[1]], "dilations": [1, dilations[1]], "pads": [0, left, 0, right]}
    node.inputs[1] = make_constant(model.graph, f"{layer.weight.name}_second", horizontal)
    return first


def _factored(candidate: Candidate, rank: int, change: str, samples: int) -> tuple[str, LayerDecision]:
    """A factored layer's note and decision: its rank, the energy that keeps, its weight error, what the layer
    costs now, and with --data its relative output error on the `samples` calibration samples, as its measured
    figure."""
    spec = candidate.spectrum
    energy = f"{'output' if spec.unwhiten is not None else 'weight'} energy {spec.energy(rank):.3f}"
    a, b = spec.factors(rank)
    difference = candidate.matrix - a @ b
    figures = f"weight error {np.linalg.norm(difference) / max(np.linalg.norm(candidate.matrix), 1e-30):.3f}"
    output_error = None
    if candidate.second_moment is not None:
        error = np.trace(difference.T @ candidate.second_moment @ difference)
        reference = np.trace(candidate.matrix.T @ candidate.second_moment @ candidate.matrix)
        output_error = math.sqrt(max(error, 0) / max(reference, 1e-30))
        figures += f", output error {output_error:.3f} on --data"
    layer, decision = f"{candidate.layer.op} {candidate.layer.name}", f"rank {rank} of {spec.full_rank}"
    note = f"{layer}: {decision} ({energy}), {figures}, {change}"
    why = f"{energy}, {figures}, {change}"
    if output_error is None:
        return note, LayerDecision(layer, decision, why)
    measured = f"this layer's relative output error, factored, on {samples} calibration samples"
    return note, LayerDecision(layer, decision, why, output_error, measured)


def _kept_whole(candidate: Candidate, rank: int) -> tuple[str, LayerDecision]:
    """A layer not factored: its note and decision, with why (its rank is full, or would not cut enough)."""
    m, n = candidate.shape
    name = f"{candidate.layer.op} {candidate.layer.name}"
    if rank >= candidate.spectrum.full_rank:
        why = f"whole, at its full rank {rank} ({m}x{n})"
    else:
        why = (f"rank {rank} of {m}x{n} would keep {rank * (m + n) / (m * n):.0%} of its parameters (factored only "
               f"at {MAX_KEPT:.0%} or less)")
    return f"{name}: kept: {why}", LayerDecision(name, "not factored", why)


def _sum_macs(first: LayerCost, second: LayerCost) -> int | None:
    return None if first.macs is None or second.macs is None else first.macs + second.macs
