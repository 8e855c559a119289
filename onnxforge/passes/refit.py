"""Data-aware recovery (layer-wise distillation): refit the weights of layers by least squares, so that their
outputs on calibration inputs match what the model computed before a lossy pass (pruning, factorization).

Layers are refitted in graph order, each on the inputs that earlier refits already changed: after pruning,
the readers of pruned channels make up for what they lost, and the layers after them correct the error that
still drifts in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.edit import make_constant
from onnxforge.passes.activations import Sample, observe_tensors
from onnxforge.passes.base import PassContext

MAX_ROWS = 20000  # rows (tokens, output pixels) fitted per layer: enough for thousands of unknowns
# Ridge strengths tried, relative to the mean squared input; the fit is pulled towards the current weights,
# so a strong ridge changes little where the calibration data says little.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CONVOLUTIONS = ("Conv", "ConvTranspose")


@dataclass
class Targets:
    """What one layer computed before pruning at some output positions (token or pixel), per sample."""

    positions: list[np.ndarray]  # flat indices over the output's batch and position axes
    rows: list[np.ndarray]  # [positions, output channels]
    shapes: list[tuple[int, ...]]  # of the whole output

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
    model: Model, layers: Sequence[gs.Node], samples: Sequence[Sample], ctx: PassContext
) -> dict[int, Targets]:
    """Each layer's outputs on the samples at random positions (enough for its fit), by node id."""
    rng = np.random.default_rng(0)
    per_sample = 2 * MAX_ROWS // max(len(samples), 1) + 1  # enough to fill both the fit and its check
    names = {node.outputs[0].name: node for node in layers}
    targets = {id(node): Targets([], [], []) for node in layers}

    def add(name: str, value: np.ndarray) -> None:
        node = names[name]
        rows = channels_last(node, value)
        positions = np.sort(rng.choice(len(rows), min(per_sample, len(rows)), replace=False))
        targets[id(node)].positions.append(positions)
        targets[id(node)].rows.append(rows[positions].astype(np.float64))
        targets[id(node)].shapes.append(value.shape)

    observe_tensors(model, list(names), samples, ctx, add)
    return targets


def refit_layers(
    model: Model, layers: Sequence[gs.Node], targets: dict[int, Targets], samples: Sequence[Sample], ctx: PassContext
) -> int:
    """Refit the weight (and bias) of each layer to its targets from its current inputs; return how many.

    Each fit is ridge regression towards the current weights, its strength chosen on a quarter of the
    samples held back from the fit; a layer whose current weights do best there keeps them.
    """
    rng = np.random.default_rng(1)
    refitted = 0
    for node in layers:
        inputs: list[np.ndarray] = []
        observe_tensors(model, [node.inputs[0].name], samples, ctx, lambda _, value: inputs.append(value))
        bias, target = _bias(node), targets[id(node)]
        rows = [
            (input_rows(node, x, positions, shape, bias is not None), y)
            for x, positions, shape, y in zip(inputs, target.positions, target.shapes, target.rows)
        ]
        fit, check = _split(rows, rng)
        current = _design_weights(node, bias)
        ridge = _best_ridge(fit, check, current)
        if ridge is None:
            continue
        _write(model, node, bias, _ridge_solution(*_stack(rows, MAX_ROWS, rng), current, ridge))
        refitted += 1
    return refitted


def _split(rows: list, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """(fit, check) design rows and targets: the last quarter of the samples checks, or every 4th row of one."""
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


def _best_ridge(fit: tuple, check: tuple, current: np.ndarray) -> float | None:
    """The ridge strength whose fit predicts the check rows best, or None when the current weights do."""
    x, y = check
    best, best_error = None, float(np.sum((x @ current - y) ** 2))
    for ridge in RIDGES:
        error = float(np.sum((x @ _ridge_solution(*fit, current, ridge) - y) ** 2))
        if error < best_error:
            best, best_error = ridge, error
    return best


def _ridge_solution(x: np.ndarray, y: np.ndarray, current: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |x W - y|^2 + r |W - current|^2, with r `ridge` times the mean squared input."""
    gram = x.T @ x
    strength = ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    gram[np.diag_indices_from(gram)] += strength
    return np.linalg.solve(gram, x.T @ y + strength * current)


def refittable(node: gs.Node) -> bool:
    """Whether recovery can refit `node`: a MatMul, Gemm or ungrouped 2-D Conv or ConvTranspose with a constant
    weight."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant):
        return False
    if node.op in CONVOLUTIONS:
        explicit = node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") and "output_shape" not in node.attrs
        return node.attrs.get("group", 1) == 1 and len(weight.shape) == 4 and explicit
    if node.op == "Gemm":
        beta_ok = node.attrs.get("beta", 1.0) == 1.0 or not _has_bias(node)
        return not node.attrs.get("transA", 0) and node.attrs.get("alpha", 1.0) == 1.0 and beta_ok
    return node.op == "MatMul" and len(weight.shape) == 2


def _has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and len(node.inputs[2].shape) <= 1


def _bias(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(node, input) of the consumer's bias: its own (Gemm, Conv), or the constant of an Add right after a MatMul."""
    if _has_bias(node):
        return node, 2
    readers = node.outputs[0].outputs
    if node.op != "MatMul" or len(readers) != 1 or readers[0].op != "Add":
        return None
    add, width = readers[0], node.inputs[1].shape[-1]
    for index, tensor in enumerate(add.inputs):
        if isinstance(tensor, gs.Constant) and tensor.shape in ([width], (width,)):
            return add, index
    return None


def channels_last(node: gs.Node, value: np.ndarray) -> np.ndarray:
    """A layer output as rows of channels: [positions, channels]."""
    if node.op in CONVOLUTIONS:
        return np.moveaxis(value, 1, -1).reshape(-1, value.shape[1])
    return value.reshape(-1, value.shape[-1])


def input_rows(
    node: gs.Node, x: np.ndarray, positions: np.ndarray, output_shape: tuple[int, ...], with_bias: bool
) -> np.ndarray:
    """The fit's design rows for the output `positions`: what the layer reads there (a trailing 1 for the bias)."""
    if node.op == "Conv":
        rows = _patches(node, x, positions)
    elif node.op == "ConvTranspose":
        rows = _transposed_patches(node, x, output_shape[2:])[positions]
    else:
        rows = x.reshape(-1, x.shape[-1])[positions]
    rows = rows.astype(np.float64)
    return np.hstack([rows, np.ones((len(rows), 1))]) if with_bias else rows


def _patches(node: gs.Node, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """im2col at some output positions of a 2-D Conv: the input window each reads (C, kh, kw order)."""
    kernel = node.inputs[1].shape[2:]
    strides = node.attrs.get("strides", [1] * len(kernel))
    dilations = node.attrs.get("dilations", [1] * len(kernel))
    pads = node.attrs.get("pads", [0] * 2 * len(kernel))
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, oh, ow, kh, kw = windows.shape
    batch, row, column = np.unravel_index(positions, (n, oh, ow))
    return windows[batch, :, row, column].reshape(len(positions), c * kh * kw)


def _transposed_patches(node: gs.Node, x: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """One row per output position of a 2-D ConvTranspose, holding the input value each kernel tap scatters
    there, or 0 (C, kh, kw order)."""
    n, c, h, w = x.shape
    kh, kw = node.inputs[1].shape[2:]
    strides = node.attrs.get("strides", [1, 1])
    dilations = node.attrs.get("dilations", [1, 1])
    pads = node.attrs.get("pads", [0, 0, 0, 0])
    oh, ow = output_size
    rows = np.zeros((n, oh, ow, c, kh, kw), x.dtype)
    for ky in range(kh):
        oy = np.arange(h) * strides[0] - pads[0] + ky * dilations[0]
        inside_y = (oy >= 0) & (oy < oh)
        for kx in range(kw):
            ox = np.arange(w) * strides[1] - pads[1] + kx * dilations[1]
            inside_x = (ox >= 0) & (ox < ow)
            tap = rows[:, :, :, :, ky, kx]
            tap[:, oy[inside_y][:, None], ox[inside_x][None, :], :] = x[:, :, inside_y][:, :, :, inside_x].transpose(
                0, 2, 3, 1
            )
    return rows.reshape(n * oh * ow, c * kh * kw)


def _design_weights(node: gs.Node, bias: tuple[gs.Node, int] | None) -> np.ndarray:
    """The consumer's weights as the fit's [inputs (+1), outputs] matrix; a bias after a MatMul fits as a change (0)."""
    weight = np.asarray(node.inputs[1].values, np.float64)
    if node.op == "Conv":
        matrix = weight.reshape(len(weight), -1).T
    elif node.op == "ConvTranspose":  # [C, O, kh, kw]: a row per (C, kh, kw), as the patches
        matrix = weight.transpose(0, 2, 3, 1).reshape(-1, weight.shape[1])
    elif node.op == "Gemm" and node.attrs.get("transB", 0):
        matrix = weight.T
    else:
        matrix = weight
    if bias is None:
        return matrix
    row = np.asarray(node.inputs[2].values, np.float64) if bias[0] is node else np.zeros(matrix.shape[1])
    return np.vstack([matrix, row.reshape(1, -1)])


def _write(model: Model, node: gs.Node, bias: tuple[gs.Node, int] | None, solution: np.ndarray) -> None:
    weight = node.inputs[1]
    coefficients = solution[:-1] if bias is not None else solution
    if node.op == "Conv":
        values = coefficients.T.reshape(weight.shape)
    elif node.op == "ConvTranspose":
        c, o, kh, kw = weight.shape
        values = coefficients.reshape(c, kh, kw, o).transpose(0, 3, 1, 2)
    elif node.op == "Gemm" and node.attrs.get("transB", 0):
        values = coefficients.T
    else:
        values = coefficients
    node.inputs[1] = make_constant(model.graph, weight.name, values.astype(np.float32))
    if bias is not None:
        holder, index = bias
        old = holder.inputs[index]
        values = solution[-1].reshape(old.shape) + (0 if holder is node else np.asarray(old.values, np.float64))
        holder.inputs[index] = make_constant(model.graph, old.name, values.astype(np.float32))
