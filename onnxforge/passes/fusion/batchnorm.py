"""Fold per-channel affine ops (BatchNormalization, Mul or Add by a constant) into the weights before them.

A Conv, ConvTranspose, Gemm (or 2-D MatMul) computes y = f(x; W) + b, linear in W per output channel, so
y * s + t per channel equals f(x; W * s) + (b * s + t): the follower disappears into new weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.patterns import Declined, PatternBuilder, PatternValue, RewriteRule, Var, decline
from onnxforge.passes.fusion.base import FusionContext, RuleBasedPass
from onnxforge.pipeline.registry import register_pass

MIN_OPSET = 7  # BatchNormalization-6 defaults to training mode (is_test=0); Gemm-6 needs broadcast=1


def _producer(
    kind: str, with_bias: bool, constant: bool = True
) -> Callable[[PatternBuilder, PatternValue], PatternValue]:
    """The pattern of a `kind` node reading x and a weight (and bias), its output bound as `y`; the weight and bias
    must be constants, or, not `constant`, may be any value (a condition then says why it declines)."""

    def pattern(op, x):
        weight = op.const if constant else Var
        inputs = [x, weight("w")] + ([weight("b")] if with_bias else [])
        return getattr(op, kind)(*inputs, _name="y")

    return pattern


def _channels(node: gs.Node, w: np.ndarray) -> int | None:
    """How many output channels (axis 1 of the output) `node` has, or None if its weight does not fit."""
    if node.op == "Conv" and w.ndim >= 3:
        return w.shape[0]
    if node.op == "ConvTranspose" and w.ndim >= 3:
        group = node.attrs.get("group", 1)
        return w.shape[1] * group if w.shape[0] % group == 0 else None
    if node.op == "Gemm" and w.ndim == 2:
        return w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
    if node.op == "MatMul" and w.ndim == 2:
        return w.shape[1]
    return None


def _output_rank(node: gs.Node, w: np.ndarray) -> int:
    return w.ndim if node.op in ("Conv", "ConvTranspose") else 2


def _scaled_weight(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The weight of `node` with output channel c multiplied by s[c]."""
    ones = [1] * (w.ndim - 2)
    if node.op == "Conv":
        return w * s.reshape(-1, 1, *ones)
    if node.op == "ConvTranspose":
        # The weight is [C_in, C_out / group, ...]: output channel g * C_out / group + j is column j of block g.
        group = node.attrs.get("group", 1)
        grouped = w.reshape(group, w.shape[0] // group, *w.shape[1:])
        return (grouped * s.reshape(group, 1, w.shape[1], *ones)).reshape(w.shape)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w * s[:, None]
    return w * s[None, :]


def _bias(node: gs.Node, channels: int, b: gs.Constant | None) -> np.ndarray:
    """What `node` adds to its product, in float64: zeros when it has no bias; Gemm's beta applied."""
    if b is None:
        return np.zeros(channels)
    values = np.asarray(b.values, np.float64)
    return values * node.attrs.get("beta", 1.0) if node.op == "Gemm" else values


def _bias_fits(node: gs.Node, channels: int, b: gs.Constant | None) -> bool:
    if b is None:
        return True
    shape = tuple(np.shape(b.values))
    if node.op == "Gemm":
        # Gemm's C broadcasts to [N, M]; with the new per-column bias it must still broadcast there.
        return len(shape) <= 2 and (not shape or shape[-1] in (1, channels))
    return shape == (channels,)


def _all_float32(*tensors: gs.Tensor | None) -> bool:
    return all(t is None or np.asarray(t.values).dtype == np.float32 for t in tensors)


def _all_float32_or_float16(*tensors: gs.Tensor | None) -> bool:
    """All float32, or all float16 (an fp16 model's BatchNorm folds alike: weights computed in float64, then
    rounded once to float16, which is no further from the unfolded model than its own float16 rounding)."""
    dtypes = {np.asarray(t.values).dtype for t in tensors if t is not None}
    return dtypes in ({np.dtype(np.float32)}, {np.dtype(np.float16)})


def _fold(
    op, x: gs.Tensor, node: gs.Node, w: gs.Constant, b: gs.Constant | None, scale: np.ndarray | None, shift: np.ndarray
) -> gs.Tensor | Declined:
    """Rebuild `node` (reading x) so that it computes its old output * scale + shift, per output channel.

    Declines a scale or shift that is not finite: 0 * inf in the old graph is NaN, not a folded weight.
    """
    if not np.isfinite(shift).all() or (scale is not None and not np.isfinite(scale).all()):
        return decline("the per-channel scale or shift is not finite")
    weights = np.asarray(w.values)
    dtype = weights.dtype  # float32, or float16 from fold-batchnorm on an fp16 model
    channels = _channels(node, weights)
    bias = _bias(node, channels, b)
    if scale is not None:
        weights = _scaled_weight(node, weights.astype(np.float64), scale)
        w = op.const(weights.astype(dtype), "weight")
        bias = bias * scale
    bias = op.const((bias + shift).astype(dtype), "bias")
    if node.op == "MatMul":
        return op.Gemm(x, w, bias)
    attrs = {**node.attrs, "beta": 1.0} if node.op == "Gemm" else dict(node.attrs)
    return getattr(op, node.op)(x, w, bias, **attrs)


# --- BatchNormalization -----------------------------------------------------------------------------------


def _batchnorm(kind: str, with_bias: bool):
    producer = _producer(kind, with_bias, constant=False)

    def pattern(op, x):  # weights and statistics of any value, so that `_bn_foldable` says which is not constant
        return op.BatchNormalization(producer(op, x), *(Var(name) for name in ("scale", "shift", "mean", "var")))

    return pattern


def _bn_foldable(match, context: FusionContext, y, w, scale, shift, mean, var, b=None) -> bool | Declined:
    bn, node = match.root, y.inputs[0]
    if context.opset < MIN_OPSET:
        return decline(f"opset {context.opset} is below {MIN_OPSET}: BatchNormalization may be in training mode")
    # Before opset 14, more outputs than one meant training mode.
    if bn.attrs.get("training_mode", 0) or sum(t.name != "" for t in bn.outputs) != 1:
        return decline("the BatchNormalization is in training mode")
    if not bn.attrs.get("spatial", 1):
        return decline("the BatchNormalization has spatial=0: its statistics are not one value per channel")
    if not all(isinstance(t, gs.Constant) for t in (w, b) if t is not None):
        return decline(f"the {node.op}'s weight or bias is not a constant")
    if not all(isinstance(t, gs.Constant) for t in (scale, shift, mean, var)):
        return decline("the BatchNormalization's scale, bias, mean or variance is not a constant")
    if not _all_float32_or_float16(w, b, scale, shift, mean, var):
        return decline(f"the {node.op}'s weights and the statistics are not all float32 or all float16")
    channels = _channels(node, np.asarray(w.values))
    if channels is None or not _bias_fits(node, channels, b):
        return decline(f"the {node.op}'s weight or bias does not give it one value per output channel")
    if any(np.shape(t.values) != (channels,) for t in (scale, shift, mean, var)):
        return decline(f"the statistics are not one value per output channel of the {node.op}")
    if not (np.asarray(var.values, np.float64) + bn.attrs.get("epsilon", 1e-5) > 0).all():
        return decline("the variance plus epsilon is not positive in every channel")  # the BN divides by zero
    # A MatMul's columns are the BN channels (axis 1) only when its output is 2-D.
    if node.op == "MatMul" and (y.shape is None or len(y.shape) != 2):
        return decline("the MatMul's output is not known to be 2-D: only then are its columns the channels")
    return True


def _fold_bn(op, match, x, y, w, scale, shift, mean, var, b=None):
    epsilon = match.root.attrs.get("epsilon", 1e-5)
    s = np.asarray(scale.values, np.float64) / np.sqrt(np.asarray(var.values, np.float64) + epsilon)
    t = np.asarray(shift.values, np.float64) - np.asarray(mean.values, np.float64) * s
    return _fold(op, x, y.inputs[0], w, b, s, t)


_BN_SPELLINGS = [(k, bias) for k in ("Conv", "ConvTranspose", "Gemm") for bias in (False, True)] + [("MatMul", False)]


@register_pass("fold-batchnorm")
class FoldBatchNorm(RuleBasedPass):
    """Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or 2-D MatMul before it."""

    needs_shapes = True  # a MatMul's output rank decides whether BN's channels are its columns
    rules = (
        RewriteRule("fold-batchnorm", [_batchnorm(k, bias) for k, bias in _BN_SPELLINGS], _fold_bn, _bn_foldable),
    )


# --- Mul and Add by constants -----------------------------------------------------------------------------


def _channel_vector(c: gs.Constant, channels: int, rank: int) -> np.ndarray | None:
    """`c` as one value per output channel (axis 1 of a rank-`rank` output), or None if it varies elsewhere."""
    values = np.asarray(c.values, np.float64)
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,))


def _affine(follower: str, kind: str, with_bias: bool):
    producer = _producer(kind, with_bias)

    def pattern(op, x):
        return getattr(op, follower)(producer(op, x), op.const("c"))

    return pattern


def _per_channel(context: FusionContext, y, w, c, b=None) -> np.ndarray | Declined:
    """The constant `c` as one value per output channel of the node producing `y`, or why it is not."""
    node, weights = y.inputs[0], np.asarray(w.values)
    channels = _channels(node, weights)
    if context.opset < MIN_OPSET:
        return decline(f"opset {context.opset} is below {MIN_OPSET}")
    if channels is None or not _bias_fits(node, channels, b):
        return decline(f"the {node.op}'s weight or bias does not give it one value per output channel")
    if not _all_float32(w, b, c):
        return decline(f"the {node.op}'s weights or the constant are not float32")
    vector = _channel_vector(c, channels, _output_rank(node, weights))
    if vector is None:
        return decline("the constant varies along another axis than the output channels")
    return vector


def _fold_mul(op, context, x, y, w, c, b=None):
    s = _per_channel(context, y, w, c, b)
    return s if isinstance(s, Declined) else _fold(op, x, y.inputs[0], w, b, s, np.zeros_like(s))


def _fold_add(op, context, x, y, w, c, b=None):
    t = _per_channel(context, y, w, c, b)
    return t if isinstance(t, Declined) else _fold(op, x, y.inputs[0], w, b, None, t)


_SCALE_SPELLINGS = [(k, bias) for k in ("Conv", "ConvTranspose", "Gemm") for bias in (False, True)]


@register_pass("fold-scale-into-conv")
class FoldScaleIntoConv(RuleBasedPass):
    """Fold Mul or Add by a per-output-channel (or scalar) constant into the Conv, ConvTranspose or Gemm before it."""

    rules = (
        RewriteRule("fold-mul", [_affine("Mul", k, bias) for k, bias in _SCALE_SPELLINGS], _fold_mul),
        RewriteRule("fold-add", [_affine("Add", k, bias) for k, bias in _SCALE_SPELLINGS], _fold_add),
    )
