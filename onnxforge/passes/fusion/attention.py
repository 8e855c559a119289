"""Fuse self-attention blocks into onnxruntime's com.microsoft Attention or MultiHeadAttention.

The core every exporter writes is softmax(scale * Q @ K^T [+ mask]) @ V over heads split out of the hidden
dimension. Three layouts are recognized, each with the scale as the exporters spell it (on the scores, on Q,
on both Q and K, or absent; see SCALINGS) and with or without an additive mask:

- batch-major heads, as Hugging Face BERT writes them: Q, K, V of shape [B, S, H*d] reshaped to
  [B, S, H, d] and transposed to [B, H, S, d] (K to [B, H, d, S]), merged back by the inverse transpose;
- sequence-major packed heads, as nn.MultiheadAttention (need_weights=False, so also nn.TransformerEncoderLayer)
  exports through scaled_dot_product_attention: one [S, B, 3*E] projection unpacked into Q, K, V, each
  reshaped to [S, B*H, d], transposed and reshaped to [B, H, S, d];
- the same with 3-D heads [B*H, S, d], as nn.MultiheadAttention exports when it returns attention weights.

Where Q, K and V are projections of one input by constant weights and biases, the block becomes one
Attention node with the three weights packed; other batch-major blocks (cross-attention, computed weights)
get MultiHeadAttention on the projected Q, K and V. The mask stays the additive tensor the model computes
(expanded to [B|1, H|1, S, T], the shape onnxruntime accepts), so every mask value keeps its meaning. After a
sequence-major block of batch-first input, the output projection moves to batch-major rows, so the layout
ops around it cancel. Only static shapes and float32 are fused.

Other backends than onnxruntime get the standard Attention op where the model's opset has it (23), on the
4-D heads; below that they get nothing (standard ONNX has no attention op).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.ops import CONTRIB_DOMAIN
from onnxforge.ir.patterns import GraphBuilder, Match, RewriteRule
from onnxforge.passes.fusion.base import FusionContext, RuleBasedPass
from onnxforge.passes.registry import register_pass

STANDARD_ATTENTION_OPSET = 23

# --- pattern pieces ---------------------------------------------------------------------------------------

# How exporters apply the scale: the constants bound here multiply (`*_mul`) or divide (`*_div`) the scores.
SCALINGS: dict[str, Callable] = {
    "scores_div": lambda op, q, k: op.Div(op.MatMul(q, k), op.const("scores_div")),
    "scores_mul": lambda op, q, k: op.Mul(op.MatMul(q, k), op.const("scores_mul")),
    "query_and_key_mul": lambda op, q, k: op.MatMul(op.Mul(q, op.const("q_mul")), op.Mul(k, op.const("k_mul"))),
    "query_mul": lambda op, q, k: op.MatMul(op.Mul(q, op.const("q_mul")), k),
    "query_div": lambda op, q, k: op.MatMul(op.Div(q, op.const("q_div")), k),
    # baddbmm, as nn.MultiheadAttention computes masked scores when it returns weights: alpha * (q' @ k).
    "query_and_scores_mul": lambda op, q, k: op.Mul(
        op.MatMul(op.Mul(q, op.const("q_mul")), k), op.const("scores_mul")
    ),
    "unscaled": lambda op, q, k: op.MatMul(q, k),
}


def _core(op, qh, kt, vh, mask):
    """softmax(scale * qh @ kt [+ mask]) @ vh; the Softmax's output is bound as `probs`."""
    scores = op.either(*(scaling(op, qh, kt) for scaling in SCALINGS.values()))
    return op.MatMul(op.Softmax(op.either(op.Add(scores, mask), scores), _name="probs"), vh)


def _projection(op, x, which: str):
    """x @ W + b with constant W and b: the Q, K or V projection (or all three packed, which="")."""
    return op.Add(op.MatMul(x, op.const(f"w{which}")), op.const(f"b{which}"), _name=which or "qkv")


def _batch_major(projected: bool):
    """Heads split as [B, S, H*d] -> [B, S, H, d] -> [B, H, S, d] and merged back the inverse way."""

    def pattern(op, x, q, k, v, mask):
        if projected:
            q, k, v = (_projection(op, x, which) for which in "qkv")
        qh = op.Transpose(op.Reshape(q, op.const("q_shape")), perm=[0, 2, 1, 3], _name="qh")
        kt = op.Transpose(op.Reshape(k, op.const("k_shape")), perm=[0, 2, 3, 1], _name="kt")
        vh = op.Transpose(op.Reshape(v, op.const("v_shape")), perm=[0, 2, 1, 3], _name="vh")
        context = _core(op, qh, kt, vh, mask)
        return op.Reshape(op.Transpose(context, perm=[0, 2, 1, 3]), op.const("out_shape"))

    pattern.__name__ = "batch_major_projected" if projected else "batch_major"
    return pattern


def _unpacked_qkv(op, x):
    """Q, K and V taken out of nn.MultiheadAttention's packed [S, B, 3*E] projection, each [S, B, E].

    The exporter writes Reshape to [S, B, 3, E] then Unsqueeze to [1, S, B, 3, E]; simplify-layout makes
    that one Reshape. Both are accepted, the 5-D result bound as `qkv_split`.
    """
    projection = _projection(op, x, "")
    split = op.either(
        op.Unsqueeze(op.Reshape(projection, op.const("qkv_split_shape")), 0, _name="qkv_split"),
        op.Reshape(projection, op.const("qkv_split_shape"), _name="qkv_split"),
    )
    packed = op.Squeeze(op.Transpose(split, perm=[3, 1, 2, 0, 4]), 3, _name="qkv_packed")
    return [op.Gather(packed, index, axis=lambda axis: axis in (None, 0)) for index in range(3)]


def _sequence_major(heads_rank: int):
    """Heads split as [S, B, E] -> [S, B*H, d] -> [B*H, S, d] (-> [B, H, S, d]) and merged to [S, B, ...]."""

    def pattern(op, x, mask):
        rows = [
            op.Reshape(value, op.const(f"{n}_rows_shape"), _name=f"{n}_rows")
            for value, n in zip(_unpacked_qkv(op, x), "qkv")
        ]
        if heads_rank == 4:
            qh, kh, vh = (
                op.Reshape(op.Transpose(r, perm=[1, 0, 2]), op.const(f"{n}_heads_shape"), _name=f"{n}h")
                for r, n in zip(rows, "qkv")
            )
            kt = op.Transpose(kh, perm=[0, 1, 3, 2], _name="kt")
            merge = [2, 0, 1, 3]
        else:
            qh = op.Transpose(rows[0], perm=[1, 0, 2], _name="qh")
            kt = op.Transpose(rows[1], perm=[1, 2, 0], _name="kt")
            vh = op.Transpose(rows[2], perm=[1, 0, 2], _name="vh")
            merge = [1, 0, 2]
        context = _core(op, qh, kt, vh, mask)
        return op.Reshape(op.Transpose(context, perm=merge), op.const("out_shape"))

    pattern.__name__ = f"sequence_major_{heads_rank}d"
    return pattern


# --- what a match means ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heads:
    """The dimensions of a matched block: batch, query and key lengths, heads and head size (Q, K and V alike)."""

    batch: int
    length: int
    key_length: int
    heads: int
    size: int


def _shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The static shape of a tensor, or None when any dimension is unknown or symbolic."""
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)


def _batch_major_heads(match: Match) -> Heads | None:
    """The dimensions of a batch-major block whose reshapes only split and merge the hidden dimension."""
    b = match.bindings
    q, k, v = _shape(b["qh"]), _shape(b["kt"]), _shape(b["vh"])
    if q is None or k is None or v is None or len(q) != 4:
        return None
    batch, heads, length, size = q
    key_length = k[-1]
    if k != (batch, heads, size, key_length) or v != (batch, heads, key_length, size):
        return None
    projected = (_shape(b["q"]), _shape(b["k"]), _shape(b["v"]))
    expected = ((batch, length, heads * size), (batch, key_length, heads * size), (batch, key_length, heads * size))
    return Heads(batch, length, key_length, heads, size) if projected == expected else None


def _sequence_major_heads(match: Match) -> Heads | None:
    """The dimensions of a sequence-major block whose reshapes only unpack, split and merge heads."""
    b = match.bindings
    x, split, q = _shape(b["x"]), _shape(b["qkv_split"]), _shape(b["qh"])
    if x is None or split is None or q is None or len(x) != 3 or len(split) != 5 or q[-1] == 0:
        return None
    length, batch, hidden, size = x[0], x[1], split[4], q[-1]
    if split != (1, length, batch, 3, hidden) or _shape(b["qkv_packed"]) != (3, length, batch, hidden):
        return None
    if hidden % size:
        return None
    heads = hidden // size
    rows = (length, batch * heads, size)
    if len(q) == 4:
        head_shapes = {"qh": (batch, heads, length, size), "kh": (batch, heads, length, size)}
        head_shapes.update(vh=(batch, heads, length, size), kt=(batch, heads, size, length))
    else:
        head_shapes = {"qh": (batch * heads, length, size), "vh": (batch * heads, length, size)}
        head_shapes.update(kt=(batch * heads, size, length))
    if any(_shape(b[f"{n}_rows"]) != rows for n in "qkv") or any(_shape(b[n]) != s for n, s in head_shapes.items()):
        return None
    return Heads(batch, length, length, heads, size)


def _softmax_over_keys(match: Match, context: FusionContext) -> bool:
    """Softmax over the last axis (before opset 13 Softmax flattens from its axis, by default 1)."""
    probs = match.bindings["probs"]
    axis = probs.inputs[0].attrs.get("axis", -1 if context.opset >= 13 else 1)
    rank = len(match.bindings["kt"].shape)
    return axis in (-1, rank - 1)


def _scale(match: Match) -> float | None:
    """The factor the scores are multiplied by (1 when unscaled); None unless it is one finite number, not 0."""
    scale = 1.0
    for name in ("scores_div", "scores_mul", "q_mul", "k_mul", "q_div"):
        if name in match.bindings:
            values = match.value(name).astype(np.float64)
            if values.size != 1:
                return None
            factor = float(values.reshape(()))
            scale = scale / factor if name.endswith("_div") else scale * factor
    return scale if scale != 0.0 and np.isfinite(scale) else None


def _is_float32(*tensors: gs.Tensor) -> bool:
    return all(t.dtype == np.float32 for t in tensors)


def _packed_weights(match: Match, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The [E_in, N] weight and [N] bias of the projections `names` side by side; None if they do not pack."""
    weights, biases = [match.value(f"w{n}") for n in names], [match.value(f"b{n}") for n in names]
    for w, b in zip(weights, biases):
        if w.ndim != 2 or w.dtype != np.float32 or b.dtype != np.float32 or b.size not in (1, w.shape[1]):
            return None
        if b.ndim > 1 and b.shape[:-1] != (1,) * (b.ndim - 1):  # a bias over more than the last axis
            return None
    bias = [np.broadcast_to(b.reshape(-1), (w.shape[1],)) for w, b in zip(weights, biases)]
    return np.concatenate(weights, axis=1), np.concatenate(bias)


def _attention_bias(op: GraphBuilder, mask: gs.Tensor | None, dims: Heads, scores_rank: int):
    """The additive mask as onnxruntime takes it, [B|1, H|1, S, T]; "" for none; None if it does not fit."""
    if mask is None:
        return ""
    shape = _shape(mask)
    if shape is None or not _is_float32(mask) or len(shape) > scores_rank:
        return None
    is_4d = len(shape) == 4
    shape = (1,) * (scores_rank - len(shape)) + shape
    if scores_rank == 3:  # [B*H|1, S|1, T|1] -> [B|1, H|1, S|1, T|1]
        if shape[0] not in (1, dims.batch * dims.heads):
            return None
        shape = (1, 1, *shape[1:]) if shape[0] == 1 else (dims.batch, dims.heads, *shape[1:])
        mask, is_4d = op.Reshape(mask, op.const(np.array(shape, np.int64), "bias_shape")), True
    full = (dims.batch, dims.heads, dims.length, dims.key_length)
    if any(m not in (1, f) for m, f in zip(shape, full)):
        return None
    if not is_4d or shape[2:] != full[2:]:
        mask = op.Expand(mask, op.const(np.array([1, 1, *full[2:]], np.int64), "bias_expand"))
    return mask


# --- replacements ---------------------------------------------------------------------------------------


def _optional_inputs(*inputs) -> list:
    """Inputs with trailing absent ones ("" or None) dropped and inner ones left empty."""
    inputs = list(inputs)
    while inputs and (inputs[-1] is None or isinstance(inputs[-1], str)):
        inputs.pop()
    return [None if isinstance(i, str) else i for i in inputs]


def _as_matched_output(op, out: gs.Variable, match: Match, shape: tuple[int, ...]):
    """Reshape the fused output (of `shape`) to the static shape the matched merge produced; None if unknown."""
    # onnx's shape inference does not know contrib ops: give later rules the shape it cannot infer.
    out.dtype, out.shape = np.float32, list(shape)
    target = _shape(match.output)
    if target is None or target == shape:
        return out if target else None
    # Not the merge's own target: its 0s would copy dimensions of another input than ours.
    return op.Reshape(out, op.const(np.array(target, np.int64), "out_shape"))


def _fuse_batch_major(op, match: Match, context: FusionContext, projected: bool):
    """Attention on x with packed weights (projected), else MultiHeadAttention on the projected Q, K, V."""
    dims = _batch_major_heads(match)
    if dims is None or not _softmax_over_keys(match, context):
        return None
    scale, bias = _scale(match), _attention_bias(op, match.bindings.get("mask"), dims, 4)
    if scale is None or bias is None:
        return None
    b = match.bindings
    if projected:
        x, packed = b["x"], _packed_weights(match, ("q", "k", "v"))
        if packed is None or not _is_float32(x) or len(x.shape) != 3 or dims.key_length != dims.length:
            return None
        weight, qkv_bias = op.const(packed[0], "qkv_weight"), op.const(packed[1], "qkv_bias")
        inputs = _optional_inputs(x, weight, qkv_bias, None, None, bias)
        out = op.Attention(*inputs, _domain=CONTRIB_DOMAIN, num_heads=dims.heads, scale=scale)
    else:
        if not _is_float32(b["q"], b["k"], b["v"]):
            return None
        inputs = _optional_inputs(b["q"], b["k"], b["v"], None, None, bias)
        out = op.MultiHeadAttention(*inputs, _domain=CONTRIB_DOMAIN, num_heads=dims.heads, scale=scale)
    return _as_matched_output(op, out, match, (dims.batch, dims.length, dims.heads * dims.size))


def _fuse_sequence_major(op, match: Match, context: FusionContext):
    """Attention on x transposed to batch-major, with nn.MultiheadAttention's packed weights."""
    dims = _sequence_major_heads(match)
    if dims is None or not _softmax_over_keys(match, context):
        return None
    scale = _scale(match)
    bias = _attention_bias(op, match.bindings.get("mask"), dims, len(match.bindings["kt"].shape))
    packed, x = _packed_weights(match, ("",)), match.bindings["x"]
    if scale is None or bias is None or packed is None or not _is_float32(x):
        return None
    weight, qkv_bias = op.const(packed[0], "qkv_weight"), op.const(packed[1], "qkv_bias")
    inputs = _optional_inputs(op.Transpose(x, perm=[1, 0, 2]), weight, qkv_bias, None, None, bias)
    out = op.Attention(*inputs, _domain=CONTRIB_DOMAIN, num_heads=dims.heads, scale=scale)
    out.dtype, out.shape = np.float32, [dims.batch, dims.length, dims.heads * dims.size]
    out = op.Transpose(out, perm=[1, 0, 2])
    return _as_matched_output(op, out, match, (dims.length, dims.batch, dims.heads * dims.size))


def _fuse_standard(op, match: Match, context: FusionContext, qh, kt, vh):
    """The standard Attention op (opset 23) on 4-D heads [B, H, S, d]; the split and merge stay as they are."""
    q, k, v = _shape(qh), _shape(kt), _shape(vh)
    if q is None or k is None or v is None or len(q) != 4 or not _is_float32(qh, kt, vh):
        return None
    batch, heads, length, size = q
    if k != (batch, heads, size, k[3]) or v != (batch, heads, k[3], size):
        return None
    dims = Heads(batch, length, k[3], heads, size)
    scale, mask = _scale(match), _attention_bias(op, match.bindings.get("mask"), dims, 4)
    if scale is None or mask is None or not _softmax_over_keys(match, context):
        return None
    return op.Attention(*_optional_inputs(qh, op.Transpose(kt, perm=[0, 1, 3, 2]), vh, mask), scale=scale)


def _sequence_major_projection(op, a):
    """nn.MultiheadAttention's output projection of batch-first input: rows of [S, B, E] through a Gemm."""
    rows = op.Reshape(op.Transpose(a, perm=[1, 0, 2]), op.const("rows_shape"), _name="rows")
    projected = op.Gemm(rows, op.const("w"), op.const("b"), transA=lambda t: not t, _name="projected")
    return op.Transpose(op.Reshape(projected, op.const("back_shape")), perm=[1, 0, 2])


def _project_batch_major(op, match: Match, a, w, b):
    """The same projection on [B, S, E] directly: x @ W + b (the Transposes around it cancel)."""
    x, rows, out = _shape(a), _shape(match.bindings["rows"]), _shape(match.output)
    gemm = match.bindings["projected"].inputs[0]
    if x is None or rows is None or out is None or len(x) != 3 or not _is_float32(a, w, b):
        return None
    batch, length, width = x
    weight = np.asarray(w.values).T if gemm.attrs.get("transB", 0) else np.asarray(w.values)
    bias = np.asarray(b.values)
    if rows != (length * batch, width) or weight.ndim != 2 or weight.shape[0] != width:
        return None
    if out != (batch, length, weight.shape[1]) or bias.size not in (1, weight.shape[1]) or bias.ndim > 2:
        return None
    if bias.ndim == 2 and bias.shape[0] != 1:
        return None
    alpha, beta = gemm.attrs.get("alpha", 1.0), gemm.attrs.get("beta", 1.0)
    weight = weight * np.float32(alpha) if alpha != 1.0 else weight
    bias = np.broadcast_to(bias.reshape(-1) * np.float32(beta), (weight.shape[1],))
    weight, bias = op.const(weight.astype(np.float32), "weight"), op.const(bias.astype(np.float32), "bias")
    return op.Add(op.MatMul(a, weight), bias)


def _uses_contrib_ops(match, context: FusionContext) -> bool:
    return context.contrib_ops


def _has_standard_attention(match, context: FusionContext) -> bool:
    # On onnxruntime the contrib ops above are preferred (packed projections); they match at the merge Reshape,
    # after this core's MatMul in node order, so this rule must not run there.
    return not context.contrib_ops and context.opset >= STANDARD_ATTENTION_OPSET


RULES = [
    RewriteRule(
        "attention",
        [_batch_major(projected=True)],
        lambda op, match, context: _fuse_batch_major(op, match, context, projected=True),
        _uses_contrib_ops,
    ),
    RewriteRule(
        "attention-sequence-major",
        [_sequence_major(heads_rank=4), _sequence_major(heads_rank=3)],
        _fuse_sequence_major,
        _uses_contrib_ops,
    ),
    RewriteRule(
        "multihead-attention",
        [_batch_major(projected=False)],
        lambda op, match, context: _fuse_batch_major(op, match, context, projected=False),
        _uses_contrib_ops,
    ),
    RewriteRule("attention-standard", _core, _fuse_standard, _has_standard_attention),
    RewriteRule("batch-major-projection", _sequence_major_projection, _project_batch_major),
]


@register_pass("fuse-attention")
class FuseAttention(RuleBasedPass):
    """Fuse self-attention (Q/K/V projections, scaling, optional mask, Softmax) into one onnxruntime op."""

    rules = RULES
    order = 50
    needs_shapes = True
