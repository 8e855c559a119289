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
ops around it cancel. Only float32 is fused.

Batch-major blocks may have dynamic batch and sequence axes (TorchScript's `dynamic_axes`, the dynamo
exporter): the head reshapes' targets are read back from their shape arithmetic (onnxforge.ir.shape_values)
and each must provably split [B, S, H*d] into constant H heads of constant size d, and the merge undo it. The
dynamo exporter's spelling of scaled_dot_product_attention is recognized too: K^T through [B*H, T, d] rows,
and a softmax guarded against fully masked rows (NaN becomes 0; Hugging Face models exported by TorchScript
write it too). onnxruntime's Attention gives NaN for such a row, so where the mask may hold -inf (never +inf
or NaN) and is one for every head, the fused output is set to 0 in the rows whose keys are all -inf: what the
guard gives. Sequence-major blocks still need static shapes.

Other backends than onnxruntime get the standard Attention op where the model's opset has it (23), on the
4-D heads; below that they get nothing (standard ONNX has no attention op).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.ir.ops import CONTRIB_DOMAIN
from onnxforge.ir.patterns import (
    Declined,
    GraphBuilder,
    Match,
    RewriteRule,
    Var,
    decline,
)
from onnxforge.ir.shape_values import (
    Dim,
    dims_of,
    is_unnamed,
    reshaped,
    same_dims,
    shape_value,
    traced_dims,
)
from onnxforge.passes.fusion.base import NO_CONTRIB_OPS, FusionContext, RuleBasedPass
from onnxforge.pipeline.registry import register_pass

STANDARD_ATTENTION_OPSET = 23
REDUCE_AXES_INPUT_OPSET = 18  # ReduceMax takes its axes as an input from opset 18, as an attribute before

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
    """softmax(scale * qh @ kt [+ mask]) @ vh; the Softmax's output is bound as `probs`.

    The dynamo exporter guards the softmax of scaled_dot_product_attention against rows with every key masked
    (NaN there becomes 0): that guard is bound as `guarded`.
    """
    scores = op.either(*(scaling(op, qh, kt) for scaling in SCALINGS.values()))
    probs = op.Softmax(op.either(op.Add(scores, mask), scores), _name="probs")
    is_nan = op.either(op.IsNaN(probs), op.Cast(op.IsNaN(probs), to=onnx.TensorProto.BOOL))  # masked_fill casts
    return op.MatMul(op.either(op.Where(is_nan, 0.0, probs, _name="guarded"), probs), vh)


def _projection(op, x, which: str):
    """x @ W + b with constant W and b: the Q, K or V projection (or all three packed, which="").
    Q, K and V may also have no bias (Whisper's K), bound the same way."""
    biased = op.Add(op.MatMul(x, op.const(f"w{which}")), op.const(f"b{which}"), _name=which or "qkv")
    if not which:
        return biased
    return op.either(biased, op.MatMul(x, op.const(f"w{which}"), _name=which))


def _batch_major(projected: bool):
    """Heads split as [B, S, H*d] -> [B, S, H, d] -> [B, H, S, d] and merged back the inverse way."""

    def pattern(op, x, q, k, v, mask):
        if projected:
            q, k, v = (_projection(op, x, which) for which in "qkv")
        # The targets may be constants or computed from Shape (dynamic axes): `_batch_major_heads` reads them.
        qh = op.Transpose(op.Reshape(q, Var("q_shape"), _name="q_split"), perm=[0, 2, 1, 3], _name="qh")
        kt = op.either(
            op.Transpose(op.Reshape(k, Var("k_shape"), _name="k_split"), perm=[0, 2, 3, 1], _name="kt"),
            _keys_transposed_through_rows(op, op.Reshape(k, Var("k_shape"), _name="k_split")),
        )
        vh = op.Transpose(op.Reshape(v, Var("v_shape"), _name="v_split"), perm=[0, 2, 1, 3], _name="vh")
        context = _core(op, qh, kt, vh, mask)
        # The TorchScript exporter of Hugging Face models reshapes the context to [B, -1, S, d] (no change) first.
        context = op.either(op.Reshape(context, Var("context_shape"), _name="context_view"), context)
        return op.Reshape(op.Transpose(context, perm=[0, 2, 1, 3]), Var("out_shape"))

    pattern.__name__ = "batch_major_projected" if projected else "batch_major"
    return pattern


def _keys_transposed_through_rows(op, k_split):
    """K^T as the dynamo exporter writes it in scaled_dot_product_attention: [B, H, T, d] -> [B*H, T, d],
    transposed to [B*H, d, T], -> [B, H, d, T]; bound as `kt`, with the heads `kh`."""
    kh = op.Transpose(k_split, perm=[0, 2, 1, 3], _name="kh")
    rows = op.Reshape(kh, Var("k_rows_shape"), _name="k_rows")
    return op.Reshape(op.Transpose(rows, perm=[0, 2, 1]), Var("kt_shape"), _name="kt")


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
    """The dimensions of a matched block: batch, query and key lengths, heads and head size (Q, K and V alike).

    Batch and lengths may be symbolic (see onnxforge.ir.shape_values); heads and size are constants.
    """

    batch: Dim
    length: Dim
    key_length: Dim
    heads: int
    size: int


def _shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The static shape of a tensor, or None when any dimension is unknown or symbolic."""
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)


def _head_split(match: Match, which: str) -> tuple[list[Dim], int, int] | Declined:
    """[batch, length, heads, size] of the Reshape splitting q, k or v ([batch, length, hidden]) into heads."""
    value, split = match.bindings[which], match.bindings[f"{which}_split"]
    reshape = split.inputs[0]
    dims = dims_of(value)
    if dims is None or len(dims) != 3 or not isinstance(dims[2], int):
        return decline(f"{which.upper()} is not known to be [batch, sequence, hidden] with a constant hidden size")
    target = shape_value(match.bindings[f"{which}_shape"])
    if target is None:
        return decline(f"the {which.upper()} head split's target is neither a constant nor computed from shapes")
    out = reshaped(dims, target, reshape.attrs.get("allowzero", 0))
    if (
        out is None
        or len(out) != 4
        or not all(isinstance(d, int) and d > 0 for d in out[2:])
        or out[0] != dims[0]
        or out[1] != dims[1]
        or out[2] * out[3] != dims[2]
    ):
        return decline(f"the {which.upper()} head split does not provably split the hidden axis into constant heads")
    return out, out[2], out[3]


def _batch_major_heads(match: Match) -> Heads | Declined:
    """The dimensions of a batch-major block whose reshapes only split and merge the hidden dimension.

    Dims may be symbolic: a reshape target written with Shape/Gather/Concat or with 0 and -1 entries is
    accepted where it provably splits [B, S, H*d] into [B, S, H, d] (H and d constants) and merges it back.
    """
    splits = {which: _head_split(match, which) for which in "qkv"}
    for split in splits.values():
        if isinstance(split, Declined):
            return split
    (q, heads, size), (k, k_heads, k_size), (v, v_heads, v_size) = splits["q"], splits["k"], splits["v"]
    if (k_heads, k_size) != (heads, size) or (v_heads, v_size) != (heads, size):
        return decline("Q, K and V are split into different numbers or sizes of heads")
    if not (q[0] == k[0] == v[0]) or k[1] != v[1]:
        return decline("Q, K and V do not provably share the batch, or K and V the key length")
    b = match.bindings
    if "kh" in b and not _transposes_keys(match, [k[0], heads, k[1], size]):
        return decline("the reshapes around K's transpose do not provably transpose its last two axes")
    if "context_view" in b:
        view = b["context_view"].inputs[0]
        dims, target = dims_of(view.inputs[0]), shape_value(b["context_shape"])
        # The context is [B', H, S, d] by construction; B' (from the scores, mask included) keeps its own name.
        structural = None if dims is None or len(dims) != 4 else [dims[0], heads, q[1], size]
        allowzero = view.attrs.get("allowzero", 0)
        if structural is None or target is None or reshaped(structural, target, allowzero) != structural:
            return decline("the Reshape of the context before the merge is not provably one that changes nothing")
    merge = match.root
    target = shape_value(match.bindings["out_shape"])
    merged = None if target is None else reshaped([q[0], q[1], heads, size], target, merge.attrs.get("allowzero", 0))
    merges = merged is not None and same_dims(merged, [q[0], q[1], heads * size])
    if not merges and not _same_static_size(merged, q, heads, size):
        return decline("the last Reshape does not provably merge the heads back into [batch, sequence, hidden]")
    return Heads(q[0], q[1], k[1], heads, size)


def _transposes_keys(match: Match, kh: list[Dim]) -> bool:
    """Whether [B, H, T, d] -> rows [-1, T, d] -> transposed -> [B, H, d, T] is K^T (the rows keep T and d,
    the last Reshape restores B and H)."""
    rows, back = shape_value(match.bindings["k_rows_shape"]), shape_value(match.bindings["kt_shape"])
    if rows is None or back is None or len(rows) != 3 or len(back) != 4:
        return False
    if rows[0] != -1 or list(rows[1:]) != kh[2:] or list(back[2:]) != [kh[3], kh[2]]:
        return False
    return list(back[:2]) in ([kh[0], kh[1]], [-1, kh[1]], [kh[0], -1])


def _same_static_size(merged: list[Dim] | None, q: list[Dim], heads: int, size: int) -> bool:
    """A static merge to another shape of the same size (say [B*S, H*d]): the fused output is reshaped to it."""
    dims = [*q[:2], heads, size]
    return merged is not None and all(isinstance(d, int) for d in (*merged, *dims)) and np.prod(merged) == np.prod(dims)


def _sequence_major_heads(match: Match) -> Heads | Declined:
    """The dimensions of a sequence-major block whose reshapes only unpack, split and merge heads."""
    b = match.bindings
    x, split, q = _shape(b["x"]), _shape(b["qkv_split"]), _shape(b["qh"])
    if x is None or split is None or q is None or len(x) != 3 or len(split) != 5 or q[-1] == 0:
        return decline("the input or the heads have no static shape (sequence-major blocks need static shapes)")
    length, batch, hidden, size = x[0], x[1], split[4], q[-1]
    if split != (1, length, batch, 3, hidden) or _shape(b["qkv_packed"]) != (3, length, batch, hidden):
        return decline("the packed projection is not unpacked into Q, K and V of shape [sequence, batch, hidden]")
    if hidden % size:
        return decline("the hidden size is not a multiple of the head size")
    heads = hidden // size
    rows = (length, batch * heads, size)
    if len(q) == 4:
        head_shapes = {"qh": (batch, heads, length, size), "kh": (batch, heads, length, size)}
        head_shapes.update(vh=(batch, heads, length, size), kt=(batch, heads, size, length))
    else:
        head_shapes = {"qh": (batch * heads, length, size), "vh": (batch * heads, length, size)}
        head_shapes.update(kt=(batch * heads, size, length))
    if any(_shape(b[f"{n}_rows"]) != rows for n in "qkv") or any(_shape(b[n]) != s for n, s in head_shapes.items()):
        return decline("the reshapes and transposes do not provably split Q, K and V into heads")
    return Heads(batch, length, length, heads, size)


def _softmax_over_keys(match: Match, context: FusionContext) -> bool:
    """Softmax over the last axis (before opset 13 Softmax flattens from its axis, by default 1)."""
    probs = match.bindings["probs"]
    axis = probs.inputs[0].attrs.get("axis", -1 if context.opset >= 13 else 1)
    rank = len(match.bindings["kt"].shape)
    return axis in (-1, rank - 1)


FINITE_MASK_OPS = {"Add", "Cast", "Concat", "Expand", "Mul", "Reshape", "Slice", "Squeeze", "Sub", "Unsqueeze", "Where"}


def _finite(tensor: gs.Tensor, minus_inf: bool = False, depth: int = 0) -> bool:
    """Provably free of infinities and NaN: computed from integer or boolean inputs and finite float constants
    by ops that keep finite values finite (a Mul by -1e4 of a 0/1 mask, a Where choosing 0 or finfo.min).

    With `minus_inf`, -inf is allowed too (a Where choosing 0 or -inf), never +inf or NaN: a Mul or a Sub's
    subtrahend must then be finite, since -inf * 0, -inf * -1 and x - (-inf) are not.
    """
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if values.dtype.kind != "f":
            return True
        return bool(np.isfinite(values).all() or minus_inf and not (np.isnan(values) | (values == np.inf)).any())
    if tensor.dtype is not None and np.dtype(tensor.dtype).kind in "biu":
        return True
    if depth > 16 or len(tensor.inputs) != 1 or tensor.inputs[0].op not in FINITE_MASK_OPS:
        return False
    node = tensor.inputs[0]
    if node.op == "Where":
        return all(_finite(t, minus_inf, depth + 1) for t in node.inputs[1:])
    if node.op == "Mul":
        return all(_finite(t, False, depth + 1) for t in node.inputs)
    if node.op == "Sub":
        return _finite(node.inputs[0], minus_inf, depth + 1) and _finite(node.inputs[1], False, depth + 1)
    data = node.inputs if node.op in ("Add", "Concat") else node.inputs[:1]
    return all(_finite(t, minus_inf, depth + 1) for t in data)


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
    weights = [match.value(f"w{n}") for n in names]
    biases = [match.value(f"b{n}") if f"b{n}" in match.bindings else np.zeros(1, np.float32) for n in names]
    for w, b in zip(weights, biases):
        if w.ndim != 2 or w.dtype != np.float32 or b.dtype != np.float32 or b.size not in (1, w.shape[1]):
            return None
        if b.ndim > 1 and b.shape[:-1] != (1,) * (b.ndim - 1):  # a bias over more than the last axis
            return None
    bias = [np.broadcast_to(b.reshape(-1), (w.shape[1],)) for w, b in zip(weights, biases)]
    return np.concatenate(weights, axis=1), np.concatenate(bias)


def _attention_bias(
    op: GraphBuilder, mask: gs.Tensor | None, dims: Heads, scores_rank: int, lengths: tuple[gs.Tensor, gs.Tensor]
) -> gs.Tensor | str | Declined:
    """The additive mask as onnxruntime takes it, [B|1, H|1, S, T]; "" for none.

    `lengths` are tensors whose axis 1 is S and T, to expand the mask at run time where they are symbolic.
    A symbolic mask dim that is not provably the scores' is accepted: the model's own Add says it broadcasts,
    and where it would widen the scores (a mask batch of 2 on scores of batch 1), onnxruntime refuses the bias
    instead of computing something else.
    """
    if mask is None:
        return ""
    if not _is_float32(mask):
        return decline("the mask is not float32")
    if scores_rank == 4:
        return _attention_bias_4d(op, mask, dims, lengths)
    shape = _shape(mask)
    if shape is None or len(shape) > scores_rank:
        return decline(f"the mask has no static shape of rank at most {scores_rank}")
    is_4d = len(shape) == 4
    shape = (1,) * (scores_rank - len(shape)) + shape
    if scores_rank == 3:  # [B*H|1, S|1, T|1] -> [B|1, H|1, S|1, T|1]
        if shape[0] not in (1, dims.batch * dims.heads):
            return decline("the mask does not broadcast to the scores")
        shape = (1, 1, *shape[1:]) if shape[0] == 1 else (dims.batch, dims.heads, *shape[1:])
        mask, is_4d = op.Reshape(mask, op.const(np.array(shape, np.int64), "bias_shape")), True
    full = (dims.batch, dims.heads, dims.length, dims.key_length)
    if any(m not in (1, f) for m, f in zip(shape, full)):
        return decline("the mask does not broadcast to the scores")
    if not is_4d or shape[2:] != full[2:]:
        mask = op.Expand(mask, op.const(np.array([1, 1, *full[2:]], np.int64), "bias_expand"))
    return mask


def _attention_bias_4d(op: GraphBuilder, mask: gs.Tensor, dims: Heads, lengths: tuple[gs.Tensor, gs.Tensor]):
    """The mask of 4-D scores [B, H, S, T], expanded to [.., .., S, T] unless it provably has those dims."""
    shape = dims_of(mask)
    if shape is None or len(shape) > 4:
        return decline("the mask has no known rank of at most 4")
    shape = [1] * (4 - len(shape)) + shape
    full = [dims.batch, dims.heads, dims.length, dims.key_length]
    for m, f in zip(shape, full):
        if m != 1 and m != f and isinstance(m, int) and isinstance(f, int):
            return decline("the mask does not broadcast to the scores")
    if shape[1] not in (1, dims.heads) and isinstance(shape[1], int):
        return decline("the mask has another number of heads than the scores")
    if len(mask.shape) == 4 and shape[2:] == full[2:]:
        return mask
    if all(isinstance(d, int) for d in full[2:]):
        target = op.const(np.array([1, 1, *full[2:]], np.int64), "bias_expand")
    else:  # the lengths at run time: axis 1 of the inputs they come from
        axis_1 = op.const(np.array([1], np.int64), "axis_1")
        s, t = (op.Gather(op.Shape(tensor), axis_1, axis=0) for tensor in lengths)
        target = op.Concat(op.const(np.array([1, 1], np.int64), "ones"), s, t, axis=0)
    return op.Expand(mask, target)


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
    if isinstance(dims, Declined):
        return dims
    if not _softmax_over_keys(match, context):
        return decline("the Softmax is not over the keys")
    b = match.bindings
    guards_masked_rows = "guarded" in b and "mask" in b and not _finite(b["mask"])
    if guards_masked_rows:
        declined = _why_masked_rows_cannot_be_zeroed(b["mask"])
        if declined is not None:
            return declined
    scale = _scale(match)
    if scale is None:
        return decline("the scale is not one finite constant other than 0")
    # The mask's run-time expansion reads the lengths from tensors the rewrite keeps (Q and K are removed
    # with their projections when those are fused too).
    bias = _attention_bias(op, b.get("mask"), dims, 4, (b["x"], b["x"]) if projected else (b["q"], b["k"]))
    if isinstance(bias, Declined):
        return bias
    if projected:
        x, packed = b["x"], _packed_weights(match, ("q", "k", "v"))
        if packed is None:
            return decline("the Q, K and V weights and biases do not pack into one float32 projection")
        if not _is_float32(x) or x.shape is None or len(x.shape) != 3:
            return decline("the input is not a float32 [batch, sequence, hidden] tensor")
        weight, qkv_bias = op.const(packed[0], "qkv_weight"), op.const(packed[1], "qkv_bias")
        inputs = _optional_inputs(x, weight, qkv_bias, None, None, bias)
        out = op.Attention(*inputs, _domain=CONTRIB_DOMAIN, num_heads=dims.heads, scale=scale)
    else:
        if not _is_float32(b["q"], b["k"], b["v"]):
            return decline("Q, K and V are not float32")
        inputs = _optional_inputs(b["q"], b["k"], b["v"], None, None, bias)
        out = op.MultiHeadAttention(*inputs, _domain=CONTRIB_DOMAIN, num_heads=dims.heads, scale=scale)
    if guards_masked_rows:
        out = op.Where(_rows_with_a_key(op, bias, context), out, op.const(np.zeros((), np.float32), "zero"))
    # onnx's shape inference does not know contrib ops: give later rules the shape it cannot infer (the merge's).
    out.dtype = np.float32
    merged = (dims.batch, dims.length, dims.heads * dims.size)
    if _shape(match.output) is None or _shape(match.output) == merged:
        out.shape = [None if is_unnamed(d) else d for d in merged]
        return out
    return op.Reshape(out, op.const(np.array(_shape(match.output), np.int64), "out_shape"))


def _why_masked_rows_cannot_be_zeroed(mask: gs.Tensor) -> Declined | None:
    """Why the fused block could not give 0 where the guarded softmax does; None when it can.

    With scores finite, a row of softmax(scores + mask) is NaN exactly where the mask is -inf for every key,
    provided it holds no +inf or NaN. onnxruntime's Attention gives NaN there too and the same values
    elsewhere (exp(-inf) is 0), so zeroing the rows whose keys are all -inf gives what the guard gives; a
    row is one query of every head at once, so the mask must be the same for every head.
    """
    if not _finite(mask, minus_inf=True):
        return decline(
            "the softmax is guarded against fully masked rows (their NaN becomes 0) and the mask may hold +inf or "
            "NaN: onnxruntime's Attention would not give 0 there"
        )
    dims = traced_dims(mask)
    if dims is None or len(dims) > 4 or (len(dims) >= 3 and dims[-3] != 1):
        return decline(
            "the softmax is guarded against fully masked rows (their NaN becomes 0) and the mask may differ "
            "between heads: the rows to zero are not rows of the fused output"
        )
    return None


def _rows_with_a_key(op: GraphBuilder, bias: gs.Tensor, context: FusionContext) -> gs.Tensor:
    """[B|1, S, 1], true where a query attends to at least one key: the bias [B|1, 1, S, T] is not all -inf."""
    if context.opset >= REDUCE_AXES_INPUT_OPSET:
        largest = op.ReduceMax(bias, op.const(np.array([-1], np.int64), "keys_axis"), keepdims=1)
    else:
        largest = op.ReduceMax(bias, axes=[-1], keepdims=1)
    rows = op.Reshape(largest, op.const(np.array([0, -1, 1], np.int64), "rows_shape"))
    return op.Greater(rows, op.const(np.array(-np.inf, np.float32), "minus_inf"))


def _fuse_sequence_major(op, match: Match, context: FusionContext):
    """Attention on x transposed to batch-major, with nn.MultiheadAttention's packed weights."""
    dims = _sequence_major_heads(match)
    if isinstance(dims, Declined):
        return dims
    if not _softmax_over_keys(match, context):
        return decline("the Softmax is not over the keys")
    if "guarded" in match.bindings:
        return decline("the softmax is guarded against fully masked rows, which no sequence-major block takes")
    scale = _scale(match)
    bias = _attention_bias(op, match.bindings.get("mask"), dims, len(match.bindings["kt"].shape), ())
    packed, x = _packed_weights(match, ("",)), match.bindings["x"]
    if scale is None:
        return decline("the scale is not one finite constant other than 0")
    if isinstance(bias, Declined):
        return bias
    if packed is None or not _is_float32(x):
        return decline("the input or the packed Q, K and V weight and bias are not float32")
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
        return decline("Q, K^T and V are not float32 heads of static 4-D shape")
    batch, heads, length, size = q
    if k != (batch, heads, size, k[3]) or v != (batch, heads, k[3], size):
        return decline("Q, K^T and V are not heads of one [batch, heads, sequence, size] layout")
    if "guarded" in match.bindings:
        return decline("the softmax is guarded against fully masked rows, which the standard op does not take")
    dims = Heads(batch, length, k[3], heads, size)
    scale, mask = _scale(match), _attention_bias(op, match.bindings.get("mask"), dims, 4, ())
    if scale is None:
        return decline("the scale is not one finite constant other than 0")
    if isinstance(mask, Declined):
        return mask
    if not _softmax_over_keys(match, context):
        return decline("the Softmax is not over the keys")
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
        return decline("the input, the rows or the output is not float32 of static shape, or the input is not 3-D")
    batch, length, width = x
    weight = np.asarray(w.values).T if gemm.attrs.get("transB", 0) else np.asarray(w.values)
    bias = np.asarray(b.values)
    if rows != (length * batch, width) or weight.ndim != 2 or weight.shape[0] != width:
        return decline("the Gemm's rows are not the [sequence * batch, width] rows of the input")
    if out != (batch, length, weight.shape[1]) or bias.size not in (1, weight.shape[1]) or bias.ndim > 2:
        return decline("the output is not [batch, sequence, width], or the bias is not one value per column")
    if bias.ndim == 2 and bias.shape[0] != 1:
        return decline("the bias is not one value per column")
    alpha, beta = gemm.attrs.get("alpha", 1.0), gemm.attrs.get("beta", 1.0)
    weight = weight * np.float32(alpha) if alpha != 1.0 else weight
    bias = np.broadcast_to(bias.reshape(-1) * np.float32(beta), (weight.shape[1],))
    weight, bias = op.const(weight.astype(np.float32), "weight"), op.const(bias.astype(np.float32), "bias")
    return op.Add(op.MatMul(a, weight), bias)


def _uses_contrib_ops(match, context: FusionContext) -> bool | Declined:
    return context.contrib_ops or decline(NO_CONTRIB_OPS)


def _has_standard_attention(match, context: FusionContext) -> bool | Declined:
    # On onnxruntime the contrib ops above are preferred (packed projections); they match at the merge Reshape,
    # after this core's MatMul in node order, so this rule must not run there.
    if context.contrib_ops:  # not a near miss: the contrib rules say why they declined
        return decline("")
    if context.opset < STANDARD_ATTENTION_OPSET:
        return decline(
            f"the standard Attention op needs opset {STANDARD_ATTENTION_OPSET} (the model has {context.opset})"
        )
    return True


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
    needs_shapes = True
