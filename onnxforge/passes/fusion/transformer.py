"""Fuse the residual LayerNorm and the biased GELU of transformer blocks into onnxruntime's contrib ops.

- `fuse-skip-layernorm`: LayerNormalization(x + skip [+ bias]) over the last axis becomes
  com.microsoft.SkipLayerNormalization; a projection's bias added just before is taken in too. Where the
  sum is also read elsewhere (the residual path of pre-norm blocks), the op's fourth output gives it.
  Below opset 17, which has no LayerNormalization, the decomposed LayerNorm of x + skip becomes it directly.
- `fuse-bias-gelu`: Gelu(x + bias) becomes com.microsoft.BiasGelu, its tanh approximation FastGelu(x, bias).

Both need onnxruntime (other backends decline: standard ONNX has neither op), float32 and a bias or
scale that is one vector over the last axis.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.ops import CONTRIB_DOMAIN
from onnxforge.ir.patterns import Declined, Match, RewriteRule, decline
from onnxforge.ir.shape_values import is_unnamed, same_dims, traced_dims
from onnxforge.passes.fusion.base import NO_CONTRIB_OPS, FusionContext, RuleBasedPass
from onnxforge.passes.fusion.normalization import (
    LAYER_NORM_MIN_OPSET,
    _epsilon,
    _mean_with_axes_attribute,
    _mean_with_axes_input,
    _pow_2,
    _times_itself,
    _trailing_count,
)
from onnxforge.pipeline.registry import register_pass

# --- SkipLayerNormalization -----------------------------------------------------------------------------


def _add_layernorm(biased: bool, with_beta: bool):
    def pattern(op, x, skip, gamma, beta):
        total = op.Add(op.Add(x, op.const("bias")) if biased else x, skip, _name="sum", _shared=True)
        return op.LayerNormalization(total, gamma, *([beta] if with_beta else []), _name="normalized")

    pattern.__name__ = f"{'biased_' if biased else ''}add_layernorm{'' if with_beta else '_without_beta'}"
    return pattern


def _vector_over(tensor: gs.Tensor, width) -> bool:
    """A float32 tensor of shape [width]."""
    return tensor.dtype == np.float32 and tensor.shape is not None and list(tensor.shape) == [width]


def _known_same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Provably the same shape: equal static sizes or equally named symbolic dimensions, nothing unknown."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    known = [(isinstance(d, int) and d >= 0) or (isinstance(d, str) and d != "") for d in a.shape]
    return all(known) and list(a.shape) == list(b.shape)


def _skip_layernorm(op, match: Match, context: FusionContext, x, skip, gamma, beta=None):
    """SkipLayerNormalization(x, skip, gamma, beta, bias), with the sum as fourth output where it is read."""
    b = match.bindings
    layernorm = b["normalized"].inputs[0]
    shape = x.shape
    if not context.contrib_ops:
        return decline(NO_CONTRIB_OPS)
    if not _known_same_shape(x, skip):
        return decline("x and skip are not provably of one shape (SkipLayerNormalization does not broadcast)")
    if len(shape) not in (2, 3):
        return decline(f"the sum has rank {len(shape)}: SkipLayerNormalization takes [batch, sequence, hidden] or "
                       "[rows, hidden]")
    if x.dtype != np.float32 or skip.dtype != np.float32:
        return decline(f"the sum is {np.dtype(x.dtype).name if x.dtype else 'of unknown type'}: onnxruntime's "
                       "SkipLayerNormalization kernel on CPU is float32 only")
    if layernorm.attrs.get("axis", -1) not in (-1, len(shape) - 1) or layernorm.attrs.get("stash_type", 1) != 1:
        return decline("the LayerNormalization normalizes other than the last axis, or in another precision")
    width = shape[-1]
    vectors = [gamma] + ([beta] if beta is not None else []) + ([b["bias"]] if "bias" in b else [])
    if not isinstance(width, int) or not all(_vector_over(v, width) for v in vectors):
        return decline("gamma, beta or the bias is not a float32 vector over a constant hidden width")
    inputs = [x, skip, gamma, beta, b.get("bias")]
    while inputs[-1] is None:
        inputs.pop()
    epsilon = float(layernorm.attrs.get("epsilon", 1e-5))
    if not match.used_outside("sum"):
        return op.SkipLayerNormalization(*inputs, _domain=CONTRIB_DOMAIN, epsilon=epsilon)
    normalized, *_, total = op.SkipLayerNormalization(*inputs, _domain=CONTRIB_DOMAIN, _outputs=4, epsilon=epsilon)
    node = op.nodes[-1]
    node.outputs[1], node.outputs[2] = gs.Variable.empty(), gs.Variable.empty()  # mean, inverse std: unused
    return normalized, {"sum": total}


SKIP_LAYERNORM = RewriteRule(
    "skip-layernorm",
    [_add_layernorm(biased, with_beta) for biased in (True, False) for with_beta in (True, False)],
    _skip_layernorm,
)


def _add_decomposed_layernorm(mean, square):
    """gamma * (s - mean(s)) / sqrt(var(s) + eps) + beta of s = x + skip, as exporters write LayerNorm below
    opset 17, where fuse-normalization cannot make it a LayerNormalization."""

    def pattern(op, x, skip):
        total = op.Add(x, skip, _name="sum", _shared=True)
        centered = op.Sub(total, mean(op, total, "mean"), _name="centered")
        variance = mean(op, square(op, centered), "variance")
        normalized = op.Div(centered, op.Sqrt(op.Add(variance, op.const("epsilon"))))
        return op.Add(op.Mul(normalized, op.const("gamma")), op.const("beta"), _name="normalized")

    return pattern


def _skip_decomposed_layernorm(op, match: Match, context: FusionContext, x, skip, gamma, beta, epsilon):
    """SkipLayerNormalization where the opset has no LayerNormalization (the contrib op has no such limit)."""
    b = match.bindings
    if context.opset >= LAYER_NORM_MIN_OPSET:
        return decline("")  # fuse-normalization makes it a LayerNormalization first: skip-layernorm takes that
    if not context.contrib_ops:
        return decline(NO_CONTRIB_OPS)
    if _trailing_count(b["sum"], b["mean"], b["variance"]) != 1:
        return decline("the means are not both over the last axis, or its size is not constant")
    if not _known_same_shape(x, skip):
        addends = _input_and_broadcast_skip(x, skip)
        if addends is None:
            return decline(
                "x and skip are not provably of one [batch, sequence, hidden] shape, and neither is a [1, sequence, "
                "hidden] skip of the other"
            )
        x, skip = addends
    shape = x.shape
    eps = _epsilon(epsilon, len(shape) if shape else 0)
    if len(shape) not in (2, 3) or eps is None:
        return decline("x is not [batch, sequence, hidden] or [rows, hidden], or epsilon is not float32")
    if x.dtype != np.float32 or skip.dtype != np.float32 or not isinstance(shape[-1], int):
        return decline("x or skip is not float32 with a constant hidden width")
    vectors = [_over_last_axis(v, shape[-1]) for v in (gamma, beta)]
    if any(v is None for v in vectors):
        return decline("gamma or beta is not a float32 vector over the hidden width")
    inputs = [x, skip, op.const(vectors[0], "gamma"), op.const(vectors[1], "beta")]
    if not match.used_outside("sum"):
        return op.SkipLayerNormalization(*inputs, _domain=CONTRIB_DOMAIN, epsilon=eps)
    normalized, *_, total = op.SkipLayerNormalization(*inputs, _domain=CONTRIB_DOMAIN, _outputs=4, epsilon=eps)
    node = op.nodes[-1]
    node.outputs[1], node.outputs[2] = gs.Variable.empty(), gs.Variable.empty()
    return normalized, {"sum": total}


def _input_and_broadcast_skip(x: gs.Tensor, skip: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(input, skip) of x + skip where shapes read through the ops that computed them are provably one, or where
    one addend has batch 1 and the other not (position embeddings added to token embeddings, [1, S, H] +
    [B, S, H]); None otherwise.

    Their sequence lengths need not be provably equal: onnxruntime's SkipLayerNormalization refuses, at run time,
    a skip whose sequence length is not the input's, so a sum that would broadcast along the sequence fails
    instead of giving other values.
    """
    x_dims, skip_dims = traced_dims(x), traced_dims(skip)
    if x_dims is None or skip_dims is None or len(x_dims) != 3 or len(skip_dims) != 3:
        return None
    if not isinstance(x_dims[2], int) or x_dims[2] != skip_dims[2]:
        return None
    if same_dims(x_dims, skip_dims) and not any(is_unnamed(d) for d in x_dims):
        return x, skip
    if x_dims[0] == 1 and skip_dims[0] != 1:
        x, skip, x_dims, skip_dims = skip, x, skip_dims, x_dims
    if skip_dims[0] != 1 or x_dims[0] == 1:
        return None
    # A skip of one row ([1, 1, H], a learned vector) broadcasts along the sequence, which the op refuses.
    if isinstance(skip_dims[1], int) and skip_dims[1] != x_dims[1]:
        return None
    return x, skip


def _over_last_axis(values: gs.Constant, width: int) -> np.ndarray | None:
    """A float32 constant that is one vector over the last axis, as that [width] vector."""
    array = np.asarray(values.values)
    if array.dtype != np.float32 or array.size != width or array.ndim == 0 or array.shape[-1] != width:
        return None
    return array.reshape(width)


SKIP_DECOMPOSED_LAYERNORM = RewriteRule(
    "skip-layernorm-decomposed",
    [
        _add_decomposed_layernorm(mean, square)
        for mean in (_mean_with_axes_attribute, _mean_with_axes_input)
        for square in (_pow_2, _times_itself)
    ],
    _skip_decomposed_layernorm,
)


# --- BiasGelu / FastGelu with bias ----------------------------------------------------------------------


def _exact_gelu(op, x):
    return op.Gelu(op.Add(x, op.const("bias")), approximate=lambda a: a in (None, "none"))


def _contrib_gelu(op, x):
    return op.Gelu(op.Add(x, op.const("bias")), _domain=CONTRIB_DOMAIN)


def _tanh_gelu(op, x):
    return op.Gelu(op.Add(x, op.const("bias")), approximate="tanh")


def _contrib_fast_gelu(op, x):
    return op.FastGelu(op.Add(x, op.const("bias")), _domain=CONTRIB_DOMAIN)


def _last_axis_bias(x: gs.Tensor, bias: gs.Constant) -> np.ndarray | Declined:
    """The bias as a [width] vector when it adds one value per element of x's last axis; else why not."""
    values = np.asarray(bias.values)
    if values.dtype != np.float32 or x.dtype != np.float32:
        return decline("x or the bias is not float32")
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], int):
        return decline("x has no known constant last axis")
    width = x.shape[-1]
    leading = values.shape[:-1]
    # A bias of more axes than x would add leading axes to the sum.
    if values.ndim == 0 or values.shape[-1] != width or any(d != 1 for d in leading) or values.ndim > len(x.shape):
        return decline("the bias is not one vector over x's last axis")
    return values.reshape(width)


def _biased(contrib_op: str):
    def replacement(op, x, bias, context: FusionContext):
        if not context.contrib_ops:
            return decline(NO_CONTRIB_OPS)
        vector = _last_axis_bias(x, bias)
        if isinstance(vector, Declined):
            return vector
        return getattr(op, contrib_op)(x, op.const(vector, "bias"), _domain=CONTRIB_DOMAIN)

    return replacement


BIAS_GELU = RewriteRule("bias-gelu", [_exact_gelu, _contrib_gelu], _biased("BiasGelu"))
BIAS_FAST_GELU = RewriteRule("bias-fast-gelu", [_tanh_gelu, _contrib_fast_gelu], _biased("FastGelu"))


@register_pass("fuse-skip-layernorm")
class FuseSkipLayerNorm(RuleBasedPass):
    """Fuse Add (residual, optionally a bias too) + LayerNormalization into SkipLayerNormalization (onnxruntime)."""

    rules = (SKIP_LAYERNORM, SKIP_DECOMPOSED_LAYERNORM)
    needs_shapes = True


@register_pass("fuse-bias-gelu")
class FuseBiasGelu(RuleBasedPass):
    """Fuse a bias Add + Gelu into BiasGelu, or into FastGelu for the tanh approximation (onnxruntime)."""

    rules = (BIAS_GELU, BIAS_FAST_GELU)
    needs_shapes = True
