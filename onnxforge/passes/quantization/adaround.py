"""AdaRound (Nagel et al. 2020): each weight rounded up or down so that the layer's output changes least.

Given the second moment H = XᵀX of a layer's inputs, the codes of a quantized weight [K, N] (x @ W) are chosen to
minimize the expected squared output error tr(ΔWᵀ H ΔW) instead of each weight's own error: a continuous relaxation
h(V) in [0, 1] of the choice between floor and floor + 1 is optimized with Adam under a regularizer that pushes it to
0 or 1, then rounded.
"""

from __future__ import annotations

import numpy as np

from onnxforge.passes.quantization.ranges import code_range
from onnxforge.passes.quantization.weights import QuantizedWeight

# The rectified sigmoid's stretch: h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1) reaches 0 and 1 exactly.
ZETA, GAMMA = 1.1, -0.1
# The regularizer's exponent falls linearly from the first to the second after the warm-up (soft, then hard).
BETA_START, BETA_END = 20.0, 2.0
# The first fraction of the iterations fits the output error alone.
WARM_UP = 0.2
ADAM_BETAS, ADAM_EPSILON = (0.9, 0.999), 1e-8


def adaround(
    weight: np.ndarray,
    grid: QuantizedWeight,
    hessian: np.ndarray,
    out_axis: int,
    iterations: int = 200,
    regularization: float = 100.0,
    learning_rate: float = 0.1,
) -> QuantizedWeight:
    """`grid` (a quantization of `weight`) with each code re-chosen between rounding down and up, on the same scales
    and zero points, to minimize the output error tr(ΔWᵀ H ΔW) of the weight's matrix view W [K, N].

    The matrix view puts `out_axis` (the N outputs) last and flattens the other axes, in order, into the K inputs
    that `hessian` [K, K] (XᵀX of the inputs, any positive multiple) describes: a MatMul weight [K, N] as it is, a
    Conv weight [O, C, kh, kw] as [C kh kw, O]. The objective is the output error relative to that of rounding to
    nearest plus `regularization` times the mean of 1 - |2h - 1|^β over the weights (so neither term depends on the
    weight's scale or size); Adam runs `iterations` full-batch steps, deterministic. A weight whose nearest
    rounding has no output error keeps `grid`'s codes.
    """
    shape = weight.shape
    outputs = shape[out_axis]

    def matrix(array: np.ndarray) -> np.ndarray:
        view = np.moveaxis(np.asarray(array), out_axis, 0).reshape(outputs, -1).T
        return np.ascontiguousarray(view, dtype=np.float32)  # mixed memory orders would slow every step

    w, scale = matrix(weight), matrix(grid.broadcast(grid.scale))
    zero_point = matrix(grid.broadcast(grid.zero_point))
    if hessian.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"adaround needs a hessian [{w.shape[0]}, {w.shape[0]}] for a weight of shape {shape}")
    low, high = code_range(grid.spec.bits, grid.spec.signed, grid.spec.symmetric, grid.spec.seven_bit)
    floor = np.floor(w / scale)
    down = np.clip(floor + zero_point, low, high) - zero_point
    step = np.clip(floor + zero_point + 1, low, high) - zero_point - down  # 1, or 0 where the range clips both
    nearest = down + step * (w / scale - floor >= 0.5)
    h_matrix = hessian.astype(np.float32)
    rtn_error = _output_error(h_matrix, scale * nearest - w)
    if not rtn_error > 0:
        return grid
    # d(error)/dh = 2 H ΔW ⊙ s ⊙ step with ΔW = s ⊙ (down + step ⊙ h) - W, scaled so that rounding to nearest
    # has error 1; the product with H of the part that does not depend on h is computed once.
    slope = scale * step
    fixed_gradient = h_matrix @ (scale * down - w)
    gradient_scale = 2 * slope / rtn_error
    fraction = np.clip(w / scale - floor, 0, 1)
    v = -np.log((ZETA - GAMMA) / (fraction - GAMMA) - 1)  # h(V) equals the fraction: the optimization starts at W
    first, second = np.zeros_like(v), np.zeros_like(v)
    warm_up = int(iterations * WARM_UP)
    per_weight = regularization / v.size
    for t in range(1, iterations + 1):
        sigmoid = _sigmoid(v)
        h = sigmoid * (ZETA - GAMMA) + GAMMA
        inside = (h > 0) & (h < 1)
        np.clip(h, 0, 1, out=h)
        gradient = h_matrix @ (slope * h)
        gradient += fixed_gradient
        gradient *= gradient_scale
        if t > warm_up:
            decay = (t - warm_up) / max(iterations - warm_up, 1)
            beta = BETA_END + (BETA_START - BETA_END) * (1 - decay)
            centred = 2 * h - 1
            # d/dh of 1 - |2h - 1|^β is -2β |2h - 1|^(β-2) (2h - 1)
            pull = np.abs(centred) ** (beta - 2) * centred
            gradient -= (per_weight * 2 * beta) * pull
        sigmoid *= (1 - sigmoid) * (ZETA - GAMMA)
        gradient *= sigmoid * inside  # dh/dV
        first *= ADAM_BETAS[0]
        first += (1 - ADAM_BETAS[0]) * gradient
        second *= ADAM_BETAS[1]
        second += (1 - ADAM_BETAS[1]) * np.square(gradient)
        step_size = learning_rate * np.sqrt(1 - ADAM_BETAS[1] ** t) / (1 - ADAM_BETAS[0] ** t)
        v -= step_size * first / (np.sqrt(second) + ADAM_EPSILON)
    h = np.clip(_sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
    codes = down + step * (h >= 0.5) + zero_point
    moved = codes.T.reshape(outputs, *np.delete(shape, out_axis % len(shape)))
    stored = np.moveaxis(moved, 0, out_axis).astype(grid.codes.dtype)
    return QuantizedWeight(stored, grid.scale, grid.zero_point, grid.spec, grid.axis)


def _output_error(hessian: np.ndarray, delta: np.ndarray) -> float:
    """tr(Δᵀ H Δ), in float64."""
    return float(np.einsum("kn,kn->", (hessian @ delta).astype(np.float64), delta.astype(np.float64)))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))
