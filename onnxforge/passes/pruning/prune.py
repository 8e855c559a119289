"""The `prune` pass: remove the least important output channels, with every weight that reads them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.calibration.context import Calibration
from onnxforge.calibration.recovery import data_shortfall, layer_targets, layers_reached, refit_layers, refittable
from onnxforge.errors import PassUsageError
from onnxforge.ir import Model
from onnxforge.ir.edit import make_constant
from onnxforge.ir.layers import LayerCost, as_layer, describe_change, layer_costs
from onnxforge.pipeline.base import LayerDecision, Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.passes.layers import excluded_by, find_layers
from onnxforge.passes.pruning.channel_groups import ChannelGroup, ChannelGroups
from onnxforge.passes.pruning.channel_surgery import remove_channels
from onnxforge.passes.pruning.importance import DATA_METHODS, channel_importance, input_statistics
from onnxforge.passes.pruning.selection import kept_for_refit, reader_grams
from onnxforge.passes.pruning.sparsity import SPEED_NOTE, magnitude_mask, two_of_four_mask
from onnxforge.pipeline.registry import register_pass
from onnxforge.pipeline.acceptance import Acceptance
from onnxforge.pipeline.tunables import Choice, Interval, SearchTarget, Subset, Tunable

SPARSE_OPS = ("MatMul", "Gemm", "Conv")
# A search chooses which groups to prune where a model has no more than this many; with more, which channels go is
# left to scope=global (a search has too few trials to learn that many choices).
MAX_SEARCHED_GROUPS = 12
UNLISTABLE = ",:=+*?[] "  # characters a node name cannot hold in a pass list's exclude= (separators, patterns)


@register_pass("prune")
class ChannelPruning(Pass):
    """Remove the least important output channels of Conv, Gemm and MatMul layers, and their readers' inputs.

    Channels that must go together (residual adds, depthwise convs, concats, flatten into a Gemm, the
    parts of an attention head) are found as groups; a channel's importance is the norm of its producers'
    weights (l1, l2) or, on --data, its mean activation or the output change its removal causes
    (activation, taylor-free; see importance.py). scope=layer removes `ratio` of every group's channels,
    scope=global the `ratio` least important channels of all groups together (at least one kept per group);
    either way a group keeps the multiple of `round_to` channels nearest to that (kernels block channels by 8 or 16).
    With recover=true the layers after the pruned channels are refitted on --data (calibration/recovery.py), and
    each group keeps the channels from which its readers' refit best reproduces what they computed (select=refit,
    selection.py; attention heads by importance).
    structure=unstructured zeros the `ratio` smallest weights of each layer and structure=2:4 two of every
    four along the input axis: shapes stay, so only the compressed file shrinks on dense kernels.
    """

    lossless = False

    @dataclass
    class Options:
        ratio: float = 0.3
        method: Literal["l1", "l2", "activation", "taylor-free"] = "l1"
        scope: Literal["layer", "global"] = "layer"
        structure: Literal["channel", "unstructured", "2:4"] = "channel"
        exclude: list[str] = field(default_factory=list)  # op types, node names or name patterns
        round_to: int = 8  # channels a group keeps: a multiple of this (the vector width kernels block by)
        recover: bool = False  # refit the layers after pruned channels on --data by least squares
        select: Literal["refit", "importance"] = "refit"  # with recover: keep what refits best, or the most important
        measure: bool = True  # time the pruned model against the unpruned one on the pass's backend
        min_speedup: float = 1.0  # measured below this, the unpruned model is kept

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ratio = self.options.ratio
        if not 0 <= ratio < 1:
            raise PassUsageError(f"prune:ratio={ratio}: give the fraction of channels to remove, from 0 to below 1")
        if self.options.round_to < 1:
            raise PassUsageError(f"prune:round_to={self.options.round_to}: give a channel count of 1 or more")
        calibration = ctx.calibration
        if self.options.recover and not calibration.samples:
            raise PassUsageError("prune:recover=true refits layers on samples: give them with --data")
        if self.options.method in DATA_METHODS and not calibration.samples:
            raise PassUsageError(f"prune:method={self.options.method} measures activations: give samples with --data")
        if self.options.structure != "channel":
            return self._sparsify(model)
        groups = ctx.analysis(ChannelGroups, model)
        notes, decisions, candidates = [], [], []
        for group in groups:
            title = _title(group)
            if not group.prunable:
                why = group.reason
            elif self._excluded(group):
                why = "excluded by exclude="
            elif self.options.recover and not all(refittable(slot.node) for slot in group.consumers):
                reader = next(slot.node for slot in group.consumers if not refittable(slot.node))
                why = f"recovery cannot refit {reader.op} '{reader.name}', which reads them"
            else:
                candidates.append(group)
                continue
            notes.append(f"{title}: kept: {why}")
            decisions.append(LayerDecision(title, f"all {group.channels} {group.unit}", why))
        statistics = None
        if self.options.method in DATA_METHODS and candidates:
            statistics = input_statistics(model, candidates, calibration.split()[0], calibration)
        scores = [channel_importance(group, self.options.method, statistics) for group in candidates]
        chosen = self._choose(scores)
        removed = [_rounded(group, count, self.options.round_to) for group, count in zip(candidates, chosen)]
        choices, method = [], self.options.method
        for group, keep, count, wanted in zip(
            candidates, self._kept(model, candidates, scores, removed, calibration), removed, chosen
        ):
            how = f"{method}; kept for the refit" if self._selects_for_refit and group.unit != "heads" else method
            if count != wanted:
                how += f"; a multiple of round_to={self.options.round_to}"
            title = _title(group)
            notes.append(f"{title}: {group.channels} -> {keep.size} {group.unit} ({how})")
            decisions.append(LayerDecision(title, f"{keep.size} of {group.channels} {group.unit}", how))
            if count:
                choices.append((group, keep))
        stats = {"groups": len(groups), "groups_pruned": len(choices), "channels_removed": int(sum(removed))}
        if not choices:
            return PassResult(False, stats={**stats, "params_removed": 0}, notes=notes, layers=decisions)
        params_before, costs = model.stats().params, layer_costs(model.graph)
        if self.options.recover:
            notes += self._remove_and_recover(model, choices, calibration)
        else:
            remove_channels(model, choices)
        stats["params_removed"] = params_before - model.stats().params
        notes += _cost_lines(model, costs)
        return PassResult(True, stats=stats, notes=notes, layers=decisions)

    @classmethod
    def search_space(cls, model: Model, where: SearchTarget) -> dict[str, Tunable] | None:
        """Channel pruning's ratio, the scope where there are two layers or more, the importance method, and which
        channel groups are pruned where there are 2 to MAX_SEARCHED_GROUPS (`exclude`, by their first producer's
        name); with --data, activation importance too, and recovery always on. None without a Conv, Gemm or MatMul
        of constant weight."""
        layers = [layer for layer in map(as_layer, model.graph.nodes) if layer is not None and layer.op in SPARSE_OPS]
        if not layers:
            return None
        space: dict[str, Tunable] = {"ratio": Interval(0.05, 0.5, step=0.05)}
        if len(layers) > 1:  # one layer is one group: both scopes remove the same channels
            space["scope"] = Choice(("layer", "global"))
        groups = _searchable_groups(model, recover=where.has_data)
        if 2 <= len(groups) <= MAX_SEARCHED_GROUPS:
            space["exclude"] = Subset(tuple(groups))
        if where.has_data:
            return {**space, "method": Choice(("l1", "activation")), "recover": Choice((True,))}
        return {**space, "method": Choice(("l1",))}

    def acceptance(self) -> Acceptance | None:
        """With measure=true, removed channels must make the model min_speedup faster; zeroed weights keep every
        shape (only the compressed file shrinks), so structure=unstructured and 2:4 are not timed."""
        if not self.options.measure or self.options.structure != "channel":
            return None
        return Acceptance(min_speedup=self.options.min_speedup, zeroed=("params_removed",))

    def gentler(self) -> list[Pass]:
        """The pass at 7/8, 6/8, ..., 1/8 of its ratio, for a share of the error budget to choose among."""
        ratio = self.options.ratio
        return [type(self)(replace(self.options, ratio=round(ratio * k / 8, 6))) for k in range(7, 0, -1)]

    def _remove_and_recover(self, model: Model, choices: list, calibration: Calibration) -> list[str]:
        """Remove the chosen channels, then refit the layers they reach to the unpruned model's outputs."""
        layers = layers_reached(model, [slot.node for group, _ in choices for slot in group.producers])
        fit = calibration.split()[0]
        targets = layer_targets(model, layers, fit, calibration, residual=True)
        for group, keep in choices:
            for slot in group.producers:
                if id(slot.node) in targets:
                    targets[id(slot.node)].keep(slot.positions(keep))
        remove_channels(model, choices)
        shortfall = data_shortfall(layers, targets)
        refitted = refit_layers(model, layers, targets, fit, calibration)
        done = f"recovery: {refitted} of {len(layers)} layers after the pruned channels refitted on {len(fit)} samples"
        return [done, *([shortfall] if shortfall else [])]

    @property
    def _selects_for_refit(self) -> bool:
        return self.options.recover and self.options.select == "refit"

    def _kept(
        self,
        model: Model,
        groups: list[ChannelGroup],
        scores: list[np.ndarray],
        removed: list[int],
        calibration: Calibration,
    ) -> list[np.ndarray]:
        """The channels each group keeps: its most important, or with recovery those whose refit best reproduces
        what the readers computed; `removed[i]` go from group i either way.

        Attention heads are kept by importance either way: a head's loss that its reader's refit makes up for on
        the calibration samples is not made up for on others (on MiniLM, heads chosen for the refit, or by the
        model's measured output change, lost more on held-out sentences than the most important heads kept).
        """
        by_importance = [np.sort(np.argsort(score, kind="stable")[count:]) for score, count in zip(scores, removed)]
        for_refit = [count if group.unit != "heads" else 0 for group, count in zip(groups, removed)]
        if not self._selects_for_refit or not any(for_refit):
            return by_importance
        refitted = [group for group, count in zip(groups, for_refit) if count]
        grams = reader_grams(model, refitted, calibration.split()[0], calibration)
        return [
            kept_for_refit(group, count, grams) if count else keep
            for group, count, keep in zip(groups, for_refit, by_importance)
        ]

    def _excluded(self, group: ChannelGroup) -> bool:
        return any(self._excludes(slot.node) for slot in group.producers)

    def _excludes(self, node: gs.Node) -> bool:
        return excluded_by(node.op, node.name, self.options.exclude) is not None

    def _sparsify(self, model: Model) -> PassResult:
        """Zero weights in place of removing channels: unstructured by magnitude, or 2 of every 4 inputs."""
        notes, decisions, done = [SPEED_NOTE], [], {}
        zeros_before = zeros_after = total = 0
        for layer in find_layers(model.graph):
            if layer.op not in SPARSE_OPS or self._excludes(layer.node):
                continue
            if id(layer.weight) in done:  # a shared weight is pruned once
                layer.node.inputs[layer.weight_input] = done[id(layer.weight)]
                continue
            name = f"{layer.op} {layer.name}"
            values = np.asarray(layer.weight.values)
            if self.options.structure == "2:4":
                mask = two_of_four_mask(values, layer.in_axis)
                if mask is None:
                    why = f"{values.shape[layer.in_axis]} inputs do not split into groups of 4"
                    notes.append(f"{name}: kept: {why}")
                    decisions.append(LayerDecision(name, "dense", why))
                    continue
                how = "the smaller 2 of every 4 weights along its inputs"
            else:
                mask = magnitude_mask(values, self.options.ratio)
                how = f"its smallest {100 * self.options.ratio:g}% of weights by magnitude"
            sparse = np.where(mask, values, 0).astype(values.dtype)
            zeros_before += int(np.count_nonzero(values == 0))
            zeros_after += int(np.count_nonzero(sparse == 0))
            total += values.size
            replacement = make_constant(model.graph, layer.weight.name, sparse)
            done[id(layer.weight)] = replacement
            layer.node.inputs[layer.weight_input] = replacement
            zeros = f"{np.count_nonzero(sparse == 0) / values.size:.1%} zeros"
            notes.append(f"{name}: {zeros}")
            decisions.append(LayerDecision(name, zeros, how))
        changed = zeros_after > zeros_before
        stats = {"layers_sparsified": len(done), "sparsity": round(zeros_after / total, 4) if total else 0.0}
        return PassResult(changed=changed, stats=stats, notes=notes, layers=decisions)

    def _choose(self, scores: list[np.ndarray]) -> list[int]:
        """How many channels to remove from each group: `ratio` of each, or the least important overall."""
        ratio = self.options.ratio
        if self.options.scope == "layer":
            return [min(int(ratio * s.size), s.size - 1) for s in scores]
        total = sum(s.size for s in scores)
        ranked = sorted(
            ((float(value), index) for index, s in enumerate(scores) for value in s / max(float(s.mean()), 1e-30)),
        )
        removed = [0] * len(scores)
        for _, index in ranked:
            if sum(removed) >= int(ratio * total):
                break
            if removed[index] < scores[index].size - 1:
                removed[index] += 1
        return removed


def _rounded(group: ChannelGroup, removed: int, round_to: int) -> int:
    """`removed` changed so that the channels kept are the multiple of `round_to` nearest to what it keeps (ties
    keep more), at least `round_to` and at most all; attention heads, and groups smaller than `round_to`, as chosen.

    Kernels work on blocks of channels (onnxruntime's NCHWc convolutions 8 or 16 at a time, tensor cores 8), and
    a depthwise Conv with a count between multiples leaves the blocked path (docs/pruning.md has the measured cost).
    """
    if group.unit == "heads" or group.channels < round_to or removed == 0:
        return removed
    kept = group.channels - removed
    aligned = min(max(round_to, (2 * kept + round_to) // (2 * round_to) * round_to), group.channels)
    return group.channels - aligned


def _cost_lines(model: Model, before: dict[int, LayerCost]) -> list[str]:
    """One line per layer whose size changed (parameters, multiply-accumulates), and one for all of them."""
    after = layer_costs(model.graph)
    changed = [node for node in model.graph.nodes if id(node) in after and after[id(node)] != before[id(node)]]
    lines = [f"{n.op} {n.name or n.outputs[0].name}: {describe_change(before[id(n)], after[id(n)])}" for n in changed]
    if changed:
        totals = [_total([costs[id(node)] for node in changed]) for costs in (before, after)]
        lines.append(f"all {len(changed)} layers changed: {describe_change(*totals)}")
    return lines


def _total(costs: list[LayerCost]) -> LayerCost:
    macs = [c.macs for c in costs]
    return LayerCost(sum(c.params for c in costs), None if None in macs else sum(macs))


def _searchable_groups(model: Model, recover: bool) -> list[str]:
    """The first producer's name of each group the pass could prune on `model` (with `recover`: whose readers it
    can refit), for a search to leave any of them out through `exclude=`; [] when one of them has a name that a
    pass list cannot carry."""
    names = []
    for group in ChannelGroups.compute(model.copy()):
        if not group.prunable or (recover and not all(refittable(slot.node) for slot in group.consumers)):
            continue
        name = group.producers[0].node.name
        if not name or any(mark in name for mark in UNLISTABLE):
            return []
        names.append(name)
    return list(dict.fromkeys(names))


def _title(group: ChannelGroup) -> str:
    names = list(dict.fromkeys(slot.node.name or slot.node.op for slot in group.producers))
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{group.unit} of {', '.join(names[:3])}{more}"
