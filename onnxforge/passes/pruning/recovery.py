"""Data-aware recovery after pruning: refit each consumer's remaining weights by least squares, so that its
outputs on calibration inputs match what the unpruned model computed there (layer-wise distillation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.edit import make_constant
from onnxforge.passes.activations import Sample, observe_tensors
from onnxforge.passes.base import PassContext

MAX_ROWS = 20000  # rows (tokens, output pixels) fitted per consumer: enough for thousands of unknowns
MIN_ROWS_PER_UNKNOWN = 2
RIDGE = 1e-4  # relative to the mean squared input: keeps the fit stable where inputs are nearly collinear


def consumer_targets(
    model: Model, consumers: Sequence[gs.Node], samples: Sequence[Sample], ctx: PassContext
) -> dict[int, list[np.ndarray]]:
    """The outputs each consumer computes on the samples in the model as it is (before pruning), by node id."""
    names = {id(node): node.outputs[0].name for node in consumers}
    values: dict[str, list[np.ndarray]] = {name: [] for name in names.values()}
    observe_tensors(model, list(values), samples, ctx, lambda name, value: values[name].append(value))
    return {key: values[name] for key, name in names.items()}


def keep_outputs(targets: dict[int, list[np.ndarray]], node: gs.Node, positions: np.ndarray) -> None:
    """Cut a consumer's targets to the output channels it keeps, when it is itself a pruned producer."""
    axis = 1 if node.op == "Conv" else -1
    targets[id(node)] = [np.take(y, positions, axis=axis) for y in targets[id(node)]]


def refit_consumers(
    model: Model, consumers: Sequence[gs.Node], targets: dict, samples: Sequence[Sample], ctx: PassContext
) -> int:
    """Refit the weight (and bias) of each consumer to its targets from its pruned inputs; return how many.

    A consumer with fewer calibration rows (tokens, output pixels) than twice its unknowns keeps its weights.
    """
    order = {id(node): index for index, node in enumerate(model.graph.nodes)}
    fittable = sorted((node for node in consumers if _fittable(node)), key=lambda node: order[id(node)])
    rng = np.random.default_rng(0)
    refitted = 0
    for node in fittable:  # in graph order, each on inputs that earlier refits already changed
        inputs: list[np.ndarray] = []
        observe_tensors(model, [node.inputs[0].name], samples, ctx, lambda _, value: inputs.append(value))
        x, y = _rows(node, inputs, targets[id(node)])
        if len(x) < MIN_ROWS_PER_UNKNOWN * (x.shape[1] + 1):  # too few samples: a fit would learn their noise
            continue
        if len(x) > MAX_ROWS:
            chosen = rng.choice(len(x), MAX_ROWS, replace=False)
            x, y = x[chosen], y[chosen]
        _write(model, node, _least_squares(x, y, with_bias=_has_bias(node)))
        refitted += 1
    return refitted


def _fittable(node: gs.Node) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant):
        return False
    if node.op == "Conv":
        return node.attrs.get("group", 1) == 1
    if node.op == "Gemm":
        beta_ok = node.attrs.get("beta", 1.0) == 1.0 or not _has_bias(node)
        return not node.attrs.get("transA", 0) and node.attrs.get("alpha", 1.0) == 1.0 and beta_ok
    return node.op == "MatMul" and len(weight.shape) == 2


def _has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and len(node.inputs[2].shape) <= 1


def _rows(node: gs.Node, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The fit's design rows (one per output position) and targets, in float64."""
    if node.op != "Conv":
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in inputs])
        y = np.concatenate([a.reshape(-1, a.shape[-1]) for a in outputs])
        return x.astype(np.float64), y.astype(np.float64)
    patches = np.concatenate([_patches(node, a) for a in inputs])
    y = np.concatenate([np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) for a in outputs])
    return patches.astype(np.float64), y.astype(np.float64)


def _patches(node: gs.Node, x: np.ndarray) -> np.ndarray:
    """im2col: one row per output position of a 2-D Conv, holding the input window it reads (C, kh, kw order)."""
    kernel = node.inputs[1].shape[2:]
    strides = node.attrs.get("strides", [1] * len(kernel))
    dilations = node.attrs.get("dilations", [1] * len(kernel))
    pads = node.attrs.get("pads", [0] * 2 * len(kernel))
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or len(kernel) != 2:
        raise ValueError("only 2-D Convs with explicit pads are refitted")
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, oh, ow, kh, kw = windows.shape
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def _least_squares(x: np.ndarray, y: np.ndarray, with_bias: bool) -> np.ndarray:
    """Ridge least squares of y on x (and a constant column when `with_bias`): [inputs (+1), outputs]."""
    if with_bias:
        x = np.hstack([x, np.ones((len(x), 1))])
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += RIDGE * max(float(np.trace(gram)) / len(gram), 1e-12)
    return np.linalg.solve(gram, x.T @ y)


def _write(model: Model, node: gs.Node, solution: np.ndarray) -> None:
    weight = node.inputs[1]
    coefficients = solution[:-1] if _has_bias(node) else solution
    if node.op == "Conv":
        values = coefficients.T.reshape(weight.shape)
    elif node.op == "Gemm" and node.attrs.get("transB", 0):
        values = coefficients.T
    else:
        values = coefficients
    node.inputs[1] = make_constant(model.graph, weight.name, values.astype(np.float32))
    if _has_bias(node):
        bias = node.inputs[2]
        node.inputs[2] = make_constant(model.graph, bias.name, solution[-1].reshape(bias.shape).astype(np.float32))
