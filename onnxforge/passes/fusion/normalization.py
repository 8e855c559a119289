"""Fuse decomposed LayerNorm and RMSNorm into LayerNormalization (opset 17) and RMSNormalization (opset 23).

The mean/variance chain becomes the op with a unit scale; the Mul by gamma and the Add of beta that follow
are then folded into its scale and bias by a rule of their own, which handles every affine variant (and
the no-op Cast LLaMA-style RMSNorm puts between the two) without listing them in each pattern.

Below those opsets the match is declined, even for onnxruntime: its LayerNormalization and
SimplifiedLayerNormalization contrib kernels are registered in the default ONNX domain, not com.microsoft,
so a model using them below opset 17 (or 23) fails onnx.checker and would be rolled back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.ir.patterns import Declined, PatternBuilder, PatternValue, RewriteRule, decline
from onnxforge.passes.fusion.base import FusionContext, RuleBasedPass
from onnxforge.pipeline.registry import register_pass

LAYER_NORM_MIN_OPSET = 17
RMS_NORM_MIN_OPSET = 23
NOT_OVER_NORMALIZED_DIMS = "the normalization is not float32, or {} is not a float32 constant over its normalized axes"

Pattern = Callable[..., PatternValue]


def _keeps_dims(keepdims: int | None) -> bool:
    return keepdims in (None, 1)


def _mean_with_axes_attribute(op, x, name):  # ReduceMean before opset 18
    return op.ReduceMean(x, keepdims=_keeps_dims, _name=name)


def _mean_with_axes_input(op, x, name):  # ReduceMean from opset 18
    return op.ReduceMean(x, op.const(f"{name}_axes"), keepdims=_keeps_dims, _name=name)


def _pow_2(op, x):
    return op.Pow(x, 2.0)


def _times_itself(op, x):
    return op.Mul(x, x)


def _reduced_axes(reduced: gs.Tensor) -> list[int] | None:
    """The axes the ReduceMean producing `reduced` averages over; None if not explicit constants."""
    node = reduced.inputs[0]
    if len(node.inputs) > 1:
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        axes = np.asarray(node.inputs[1].values).reshape(-1).tolist()
    else:
        axes = list(node.attrs.get("axes") or [])
    return [int(a) for a in axes] or None  # no axes: every axis, which we leave alone


def _trailing_count(x: gs.Tensor, *reductions: gs.Tensor) -> int | None:
    """k when every reduction averages over exactly the last k axes of x, and those k dims are static."""
    if x.shape is None:
        return None
    rank = len(x.shape)
    counts = set()
    for reduced in reductions:
        axes = _reduced_axes(reduced)
        if axes is None or any(not -rank <= a < rank for a in axes):
            return None
        positive = sorted(a % rank for a in axes)
        if positive != list(range(rank - len(positive), rank)):
            return None
        counts.add(len(positive))
    if len(counts) != 1:
        return None
    k = counts.pop()
    return k if all(isinstance(d, int) for d in x.shape[rank - k :]) else None


def _epsilon(epsilon: gs.Constant, rank: int) -> float | None:
    """The value of a float32 scalar epsilon that does not widen what it is added to."""
    values = np.asarray(epsilon.values)
    if values.dtype != np.float32 or values.size != 1 or values.ndim > rank:
        return None
    return float(values.reshape(-1)[0])


def _dtype_name(x: gs.Tensor) -> str:
    return np.dtype(x.dtype).name if x.dtype is not None else "of unknown type"


def _unit_scale(op, x: gs.Tensor, k: int) -> gs.Constant:
    return op.const(np.ones(x.shape[len(x.shape) - k :], np.float32), "scale")


# --- LayerNorm ------------------------------------------------------------------------------------------


def _layer_norm_pattern(mean: Pattern, square: Pattern) -> Pattern:
    def pattern(op, x):  # (x - mean(x)) / sqrt(mean((x - mean(x))^2) + epsilon)
        centered = op.Sub(x, mean(op, x, "mean"), _name="centered")
        variance = mean(op, square(op, centered), "variance")
        return op.Div(centered, op.Sqrt(op.Add(variance, op.const("epsilon"))))

    return pattern


def _normalization(op_type: str, min_opset: int):
    """The replacement building `op_type` with a unit scale over the averaged trailing axes."""

    def replacement(op, x, variance, epsilon, context: FusionContext, mean=None):
        if context.opset < min_opset:
            return decline(
                f"{op_type} needs opset {min_opset} (the model has {context.opset}): put "
                f"upgrade-opset:to={min_opset} before fuse"
            )
        if x.dtype != np.float32:
            return decline(f"x is {_dtype_name(x)}: only float32 is fused")
        k = _trailing_count(x, variance) if mean is None else _trailing_count(x, mean, variance)
        if k is None:
            return decline("the means are not all over the same trailing axes of x, of constant sizes")
        eps = _epsilon(epsilon, len(x.shape))
        if eps is None:
            return decline("epsilon is not one float32 value")
        return getattr(op, op_type)(x, _unit_scale(op, x, k), axis=-k, epsilon=eps)

    return replacement


LAYER_NORM = RewriteRule(
    "layer-norm",
    [
        _layer_norm_pattern(mean, square)
        for mean in (_mean_with_axes_attribute, _mean_with_axes_input)
        for square in (_pow_2, _times_itself)
    ],
    _normalization("LayerNormalization", LAYER_NORM_MIN_OPSET),
)


# --- RMSNorm --------------------------------------------------------------------------------------------


def _divided(op, x, root_mean_square):
    return op.Div(x, root_mean_square)


def _times_reciprocal(op, x, root_mean_square):
    return op.Mul(x, op.Reciprocal(root_mean_square))


def _times_one_over(op, x, root_mean_square):  # torch.rsqrt
    return op.Mul(x, op.Div(1.0, root_mean_square))


def _rms_norm_pattern(mean: Pattern, square: Pattern, divide: Pattern) -> Pattern:
    def pattern(op, x):  # x / sqrt(mean(x^2) + epsilon)
        return divide(op, x, op.Sqrt(op.Add(mean(op, square(op, x), "variance"), op.const("epsilon"))))

    return pattern


RMS_NORM = RewriteRule(
    "rms-norm",
    [
        _rms_norm_pattern(mean, square, divide)
        for mean in (_mean_with_axes_attribute, _mean_with_axes_input)
        for square in (_pow_2, _times_itself)
        for divide in (_divided, _times_reciprocal, _times_one_over)
    ],
    _normalization("RMSNormalization", RMS_NORM_MIN_OPSET),
)


# --- the affine part: gamma and beta folded into the normalization's scale and bias ----------------------


def _normalized(op: PatternBuilder, x, kind: str, with_bias: bool) -> PatternValue:
    inputs = [x, op.const("scale")] + ([op.const("bias")] if with_bias else [])
    return getattr(op, kind)(*inputs, _name="normalized")


def _scaled(kind: str, with_bias: bool, through_cast: bool = False) -> Pattern:
    def pattern(op, x):  # normalization(x) * gamma, optionally through a Cast
        normalized = _normalized(op, x, kind, with_bias)
        if through_cast:
            normalized = op.Cast(normalized, to=onnx.TensorProto.FLOAT)
        return op.Mul(normalized, op.const("gamma"))

    return pattern


def _shifted(kind: str, with_bias: bool) -> Pattern:
    def pattern(op, x):  # normalization(x) + beta
        return op.Add(_normalized(op, x, kind, with_bias), op.const("beta"))

    return pattern


def _over_normalized_dims(values: gs.Constant, x: gs.Tensor, axis: int) -> np.ndarray | None:
    """`values` broadcast to the normalized dims of x; None unless it varies along those dims only."""
    array = np.asarray(values.values)
    if x.shape is None or array.dtype != np.float32:
        return None
    rank = len(x.shape)
    start = axis % rank if -rank <= axis < rank else None
    if start is None or array.ndim > rank:
        return None
    padded = (1,) * (rank - array.ndim) + array.shape
    normalized = x.shape[start:]
    if any(d != 1 for d in padded[:start]) or not all(isinstance(d, int) for d in normalized):
        return None
    if any(d not in (1, n) for d, n in zip(padded[start:], normalized)):
        return None
    return np.broadcast_to(array.reshape(padded[start:]), normalized)


def _fold_gamma(op, x, normalized, scale, gamma, bias=None) -> gs.Tensor | Declined:
    """The normalization with scale * gamma (and bias * gamma) as its weights."""
    node = normalized.inputs[0]
    axis = node.attrs.get("axis", -1)
    factor = _over_normalized_dims(gamma, x, axis)
    old_scale = _over_normalized_dims(scale, x, axis)
    if factor is None or old_scale is None or normalized.dtype != np.float32:
        return decline(NOT_OVER_NORMALIZED_DIMS.format("gamma"))
    inputs = [x, op.const(old_scale * factor, "scale")]
    if bias is not None:
        old_bias = _over_normalized_dims(bias, x, axis)
        if old_bias is None:
            return decline(NOT_OVER_NORMALIZED_DIMS.format("the bias"))
        inputs.append(op.const(old_bias * factor, "bias"))
    return getattr(op, node.op)(*inputs, **node.attrs)


def _fold_beta(op, x, normalized, scale, beta, bias=None) -> gs.Tensor | Declined:
    """The normalization with bias + beta as its bias."""
    node = normalized.inputs[0]
    axis = node.attrs.get("axis", -1)
    shift = _over_normalized_dims(beta, x, axis)
    old_bias = 0.0 if bias is None else _over_normalized_dims(bias, x, axis)
    if shift is None or old_bias is None or normalized.dtype != np.float32:
        return decline(NOT_OVER_NORMALIZED_DIMS.format("beta"))
    return op.LayerNormalization(x, scale, op.const(old_bias + shift, "bias"), **node.attrs)


FOLD_GAMMA = RewriteRule(
    "normalization-scale",
    [
        _scaled("LayerNormalization", with_bias=False),
        _scaled("LayerNormalization", with_bias=True),
        _scaled("RMSNormalization", with_bias=False),
        _scaled("RMSNormalization", with_bias=False, through_cast=True),  # LLaMA: weight * h.to(input_dtype)
    ],
    _fold_gamma,
)
FOLD_BETA = RewriteRule(
    "normalization-bias",
    [_shifted("LayerNormalization", with_bias=False), _shifted("LayerNormalization", with_bias=True)],
    _fold_beta,
)


@register_pass("fuse-normalization")
class FuseNormalization(RuleBasedPass):
    """Fuse decomposed LayerNorm and RMSNorm, gamma and beta included, into their single standard ops."""

    needs_shapes = True
    rules = (LAYER_NORM, RMS_NORM, FOLD_GAMMA, FOLD_BETA)
