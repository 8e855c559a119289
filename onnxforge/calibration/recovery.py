"""Data-aware recovery (layer-wise distillation): refit the weights of layers by least squares, so that their
outputs on calibration inputs match what the model computed before a lossy pass (pruning, factorization).

Layers are refitted in graph order, each on the inputs that earlier refits already changed: after pruning,
the readers of pruned channels make up for what they lost, and the layers after them correct the error that
still drifts in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.calibration.observe import observe_tensors, observed, sampled_rows
from onnxforge.data import Sample
from onnxforge.ir import Model
from onnxforge.ir.edit import make_constant
from onnxforge.ir.layers import CONVOLUTIONS, Layer, as_layer

if TYPE_CHECKING:
    from onnxforge.calibration.context import Calibration

MAX_ROWS = 20000  # rows (tokens, output pixels) fitted per layer: enough for thousands of unknowns
# Ridge strengths tried, relative to the mean squared input; the fit is pulled towards the current weights,
# so a strong ridge changes little where the calibration data says little.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# A layer read by a Sigmoid is fitted through it in SIGMOID_STEPS Gauss-Newton steps, where one step, a Gram matrix
# per output column, costs at most SIGMOID_WORK multiply-adds.
SIGMOID_STEPS = 30
SIGMOID_WORK = 2e9
# Below this many calibration rows per weight a fit solves for (of one output), a refit tends to learn its
# calibration samples rather than the layer: the pass says that more --data would help.
ROWS_PER_UNKNOWN = 4


@dataclass
class Targets:
    """What one layer computed before pruning at some output positions (token or pixel), per sample."""

    positions: list[np.ndarray]  # flat indices over the output's batch and position axes
    rows: list[np.ndarray]  # [positions, output channels]
    shapes: list[tuple[int, ...]]  # of the whole output
    # With residual targets: the rows are the layer's output plus this other addend of its residual sum, and the
    # fit's targets are those rows less the other addend's current value.
    residual: str | None = None

    def keep(self, channels: np.ndarray) -> None:
        """Keep the output channels the layer keeps, when it is itself a pruned producer."""
        self.rows = [rows[:, channels] for rows in self.rows]


def layers_reached(model: Model, producers: Sequence[gs.Node]) -> list[gs.Node]:
    """The refittable layers that read, directly or not, the outputs of `producers`, in graph order."""
    reached = {t.name for node in producers for t in node.outputs}
    layers = []
    for node in model.graph.nodes:  # graphsurgeon keeps nodes in topological order
        if any(t.name in reached for t in node.inputs):
            reached.update(t.name for t in node.outputs)
            if refittable(node):
                layers.append(node)
    return layers


def layer_targets(
    model: Model,
    layers: Sequence[gs.Node],
    samples: Sequence[Sample],
    calibration: Calibration,
    residual: bool = False,
) -> dict[int, Targets]:
    """Each layer's outputs on the samples at random positions (enough for its fit), by node id.

    With `residual`, a layer whose output goes (with its bias) into a residual sum is fitted to that sum, less the
    other addend as it is when the layer is refitted: the layer then also makes up for the error that earlier
    layers left in the residual stream, which otherwise goes on to every later layer.
    """
    rng = np.random.default_rng(0)
    per_sample = 2 * MAX_ROWS // max(len(samples), 1) + 1  # enough to fill both the fit and its check
    targets = {id(node): Targets([], [], [], _residual_addend(node) if residual else None) for node in layers}
    watched = {name for node in layers for name in (node.outputs[0].name, targets[id(node)].residual) if name}
    for sample, values in observed(model, sorted(watched), samples, calibration):
        for node in layers:
            target, output = targets[id(node)], values[node.outputs[0].name]
            if target.residual and values[target.residual].shape != output.shape:
                target.residual = None  # broadcast into the sum (a skip input may be): fit the layer's own output
            layer = as_layer(node)
            rows = layer.output_rows(output)
            positions = sampled_rows(sample, len(rows), per_sample, rng)
            picked = rows[positions].astype(np.float64)
            if target.residual:
                picked += layer.output_rows(values[target.residual])[positions]
            target.positions.append(positions)
            target.rows.append(picked)
            target.shapes.append(output.shape)
    return targets


def _residual_addend(node: gs.Node) -> str | None:
    """The other addend of a residual sum that is all that reads the layer's output (after its bias Add if any):
    an Add of two computed tensors of the same shape, or the skip input of onnxruntime's SkipLayerNormalization."""
    tensor, _ = _after_bias(node, as_layer(node).bias)
    tensor = node.outputs[0] if tensor is None else tensor
    reader = tensor.outputs[0] if len(tensor.outputs) == 1 else None
    if reader is not None and reader.op == "SkipLayerNormalization" and reader.inputs[0] is tensor:
        other = reader.inputs[1]  # shapes are often unknown after fusion: layer_targets compares the values'
        return None if isinstance(other, gs.Constant) else other.name
    if reader is None or reader.op != "Add" or len(reader.inputs) != 2 or sum(t is tensor for t in reader.inputs) != 1:
        return None
    other = next(t for t in reader.inputs if t is not tensor)
    if isinstance(other, gs.Constant) or tensor.shape is None or other.shape is None:
        return None
    return other.name if list(tensor.shape) == list(other.shape) else None


def data_shortfall(layers: Sequence[gs.Node], targets: dict[int, Targets]) -> str | None:
    """A note naming the layers whose targets hold fewer than ROWS_PER_UNKNOWN rows per weight of one output."""
    short = []
    for node in layers:
        rows = sum(len(positions) for positions in targets[id(node)].positions)
        unknowns = len(design_weights(node)[0])
        if rows < ROWS_PER_UNKNOWN * unknowns:
            short.append((rows / unknowns, rows, unknowns))
    if not short:
        return None
    _, rows, unknowns = min(short)
    return (
        f"recovery: {len(short)} of {len(layers)} layers had fewer than {ROWS_PER_UNKNOWN} calibration rows (tokens, "
        f"pixels) per weight they solve for (fewest: {rows} rows for {unknowns}); more --data samples would let "
        "the refit generalize better"
    )


def refit_layers(
    model: Model,
    layers: Sequence[gs.Node],
    targets: dict[int, Targets],
    samples: Sequence[Sample],
    calibration: Calibration,
) -> int:
    """Refit the weight (and bias) of each layer to its targets from its current inputs; return how many.

    Each fit is ridge regression towards the current weights, its strength chosen on a quarter of the
    samples held back from the fit; a layer whose current weights do best there keeps them.
    """
    rng = np.random.default_rng(1)
    refitted = 0
    for node in layers:
        layer = as_layer(node)
        bias, target = layer.bias, targets[id(node)]
        names = [node.inputs[0].name, *([target.residual] if target.residual else [])]
        seen: dict[str, list[np.ndarray]] = {name: [] for name in names}
        observe_tensors(model, names, samples, calibration, lambda name, value: seen[name].append(value))
        rows = [
            (design_rows(node, x, positions, shape, bias is not None), y)
            for x, positions, shape, y in zip(seen[names[0]], target.positions, target.shapes, target.rows)
        ]
        if target.residual:
            addends = [layer.output_rows(value)[at] for value, at in zip(seen[names[1]], target.positions)]
            rows = [(x, y - addend) for (x, y), addend in zip(rows, addends)]
        fit, check = _split(rows, rng)
        current = _design_weights(layer, bias)
        sigmoid = _sigmoid_after(node, bias, current.shape)
        choice = _best_fit(fit, check, current, sigmoid)
        if choice is None:
            continue
        ridge, through_sigmoid = choice
        x, y = _stack(rows, MAX_ROWS, rng)
        solution = _ridge_solution(x, y, current, ridge)
        if through_sigmoid:
            solution = sigmoid.refine(x, y, solution, current, ridge)
        _write(model, layer, bias, solution)
        refitted += 1
    return refitted


def _split(rows: list, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """(fit, check) design rows and targets that choose the ridge: the last quarter of the samples (rounded down, at
    least one) checks, or every 4th row of a single sample. Not the run's split (`Calibration.split`), which judges
    a pass's result: this check must never overlap the fit, also with 2 or 3 samples, where that split uses every
    sample for both."""
    if len(rows) >= 2:
        held = max(1, len(rows) // 4)
        return _stack(rows[:-held], MAX_ROWS, rng), _stack(rows[-held:], MAX_ROWS // 4, rng)
    (x, y), every = rows[0], np.arange(len(rows[0][0])) % 4 == 3
    return _stack([(x[~every], y[~every])], MAX_ROWS, rng), _stack([(x[every], y[every])], MAX_ROWS // 4, rng)


def _stack(rows: list, limit: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
    if len(x) > limit:
        chosen = rng.choice(len(x), limit, replace=False)
        x, y = x[chosen], y[chosen]
    return x, y


def _best_fit(fit: tuple, check: tuple, current: np.ndarray, sigmoid: _Sigmoid | None) -> tuple[float, bool] | None:
    """The ridge strength, and for a layer a Sigmoid reads whether to refine the fit through it, that predict the
    check rows best; None when the current weights do."""
    x, y = check

    def error(weights: np.ndarray) -> float:
        return sigmoid.error(x, y, weights) if sigmoid else float(np.sum((x @ weights - y) ** 2))

    best, best_error = None, error(current)
    for ridge in RIDGES:
        linear = _ridge_solution(*fit, current, ridge)
        candidates = [(linear, False)] + ([(sigmoid.refine(*fit, linear, current, ridge), True)] if sigmoid else [])
        for weights, through_sigmoid in candidates:
            candidate = error(weights)
            if candidate < best_error:
                best, best_error = (ridge, through_sigmoid), candidate
    return best


def _ridge_solution(x: np.ndarray, y: np.ndarray, current: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |x W - y|^2 + r |W - current|^2, with r `ridge` times the mean squared input."""
    gram = x.T @ x
    strength = ridge_strength(gram, ridge)
    gram[np.diag_indices_from(gram)] += strength
    return np.linalg.solve(gram, x.T @ y + strength * current)


def ridge_strength(gram: np.ndarray, ridge: float) -> float:
    """The ridge's strength for a Gram matrix: `ridge` times its mean diagonal (the mean squared input)."""
    return ridge * max(float(np.trace(gram)) / len(gram), 1e-12)


@dataclass
class _Sigmoid:
    """The fit of a layer that only a Sigmoid reads: judged and refined on what the sigmoid gives, which is what the
    model uses. A linear fit of the logits spends itself on saturated values far from 0 (a detector's background
    at -50 or -90), where errors change nothing."""

    offset: np.ndarray  # what the sigmoid reads on top of the fit's output: the constant of a bias Add after a MatMul

    def error(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
        return float(np.sum((self._squash(x @ weights) - self._squash(y)) ** 2))

    def refine(self, x: np.ndarray, y: np.ndarray, start: np.ndarray, current: np.ndarray, ridge: float) -> np.ndarray:
        """From `start`, argmin_W |sigmoid(x W) - sigmoid(y)|^2 + r |W - current|^2 (r as for the linear fit), by
        Levenberg-Marquardt, one output column at a time (their errors do not mix)."""
        wanted, solution = self._squash(y), start.copy()
        for column in range(start.shape[1]):
            weights, damping = solution[:, column], 1e-3
            value = self._squash(x @ weights, column)
            strength = ridge_strength(_weighted_gram(x, value), ridge)  # relative to the sigmoid's own sensitivity
            loss = self._loss(x, weights, wanted[:, column], current[:, column], strength, column)
            for _ in range(SIGMOID_STEPS):
                value = self._squash(x @ weights, column)
                gram = _weighted_gram(x, value)
                gradient = x.T @ ((wanted[:, column] - value) * value * (1 - value))
                gradient -= strength * (weights - current[:, column])
                scale = max(float(np.trace(gram)) / len(gram), 1e-12)
                while damping < 1e8:
                    step = np.linalg.solve(gram + (strength + damping * scale) * np.eye(len(gram)), gradient)
                    trial = self._loss(x, weights + step, wanted[:, column], current[:, column], strength, column)
                    if trial < loss:
                        weights, damping, improved, loss = weights + step, damping / 3, loss - trial, trial
                        break
                    damping *= 4
                else:
                    break
                if improved < 1e-9 * loss:
                    break
            solution[:, column] = weights
        return solution

    def _squash(self, logits: np.ndarray, column: int | None = None) -> np.ndarray:
        offset = self.offset if column is None else self.offset[column]
        return 0.5 * (1 + np.tanh(0.5 * (logits + offset)))  # the sigmoid, without overflow

    def _loss(self, x, weights, wanted, current, strength, column) -> float:
        fit = np.sum((self._squash(x @ weights, column) - wanted) ** 2)
        return float(fit + strength * np.sum((weights - current) ** 2))


def _weighted_gram(x: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The Gauss-Newton matrix of the sigmoid's outputs `value` = sigmoid(x w) in w."""
    slope = x * (value * (1 - value))[:, None]
    return slope.T @ slope


def _sigmoid_after(node: gs.Node, bias: tuple[gs.Node, int] | None, shape: tuple[int, int]) -> _Sigmoid | None:
    """How to fit a layer whose output (after its bias Add) only a Sigmoid reads, when its per-column fits are
    affordable; None for a linear fit."""
    tensor, added = _after_bias(node, bias)
    readers = tensor.outputs if tensor is not None else []
    if len(readers) != 1 or readers[0].op != "Sigmoid" or shape[0] * shape[0] * shape[1] * MAX_ROWS > SIGMOID_WORK:
        return None
    return _Sigmoid(np.zeros(shape[1]) if added is None else added)


def _after_bias(node: gs.Node, bias: tuple[gs.Node, int] | None) -> tuple[gs.Tensor | None, np.ndarray | None]:
    """The layer's output after its bias Add, if it has one after it, and the bias that Add adds (else None); no
    tensor when an op that does more adds the bias (BiasGelu, SkipLayerNormalization)."""
    if bias is None or bias[0] is node:
        return node.outputs[0], None
    holder, index = bias
    if holder.op != "Add":
        return None, None
    return holder.outputs[0], np.asarray(holder.inputs[index].values, np.float64).ravel()


def refittable(node: gs.Node) -> bool:
    """Whether recovery can refit `node`: a MatMul (2-D weight), a Gemm (no transA, alpha 1, beta 1 where it has a
    bias) or an ungrouped 2-D Conv or ConvTranspose with explicit padding, of a constant weight."""
    layer = as_layer(node)
    if layer is None:
        return False
    if layer.op in CONVOLUTIONS:
        explicit = node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") and "output_shape" not in node.attrs
        return node.attrs.get("group", 1) == 1 and len(layer.weight.shape) == 4 and explicit
    if layer.op == "Gemm":
        beta_ok = node.attrs.get("beta", 1.0) == 1.0 or layer.bias is None
        return not node.attrs.get("transA", 0) and node.attrs.get("alpha", 1.0) == 1.0 and beta_ok
    return layer.op == "MatMul" and len(layer.weight.shape) == 2


def design_rows(
    node: gs.Node, x: np.ndarray, positions: np.ndarray, output_shape: tuple[int, ...], with_bias: bool
) -> np.ndarray:
    """The fit's design rows for the output `positions`: what the layer reads there (a trailing 1 for the bias)."""
    rows = as_layer(node).input_rows(x, positions, output_shape)
    return np.hstack([rows, np.ones((len(rows), 1))]) if with_bias else rows


def design_weights(node: gs.Node) -> tuple[np.ndarray, bool]:
    """A refittable layer's weights as its fit solves for them ([design columns, outputs], in `design_rows`'s column
    order), and whether the design has the trailing column of ones for a bias."""
    layer = as_layer(node)
    bias = layer.bias
    return _design_weights(layer, bias), bias is not None


def _design_weights(layer: Layer, bias: tuple[gs.Node, int] | None) -> np.ndarray:
    """The layer's matrix, with a row for its bias; a bias after a MatMul fits as a change (0)."""
    matrix = layer.matrix()
    if bias is None:
        return matrix
    own = bias[0] is layer.node
    row = np.asarray(layer.node.inputs[2].values, np.float64) if own else np.zeros(matrix.shape[1])
    return np.vstack([matrix, row.reshape(1, -1)])


def _write(model: Model, layer: Layer, bias: tuple[gs.Node, int] | None, solution: np.ndarray) -> None:
    weight = layer.weight
    values = layer.stored(solution[:-1] if bias is not None else solution)
    layer.node.inputs[1] = make_constant(model.graph, weight.name, values.astype(np.float32))
    if bias is not None:
        holder, index = bias
        old = holder.inputs[index]
        values = solution[-1].reshape(old.shape) + (0 if holder is layer.node else np.asarray(old.values, np.float64))
        holder.inputs[index] = make_constant(model.graph, old.name, values.astype(np.float32))
