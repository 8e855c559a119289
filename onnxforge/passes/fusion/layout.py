"""Simplify layout ops: merge Transpose pairs, collapse Reshape-like chains, fold Pad into Conv and pool pads.

Shapes come from onnx's inference. A symbolic dimension is trusted to equal another only when both carry the
same name (inference propagates names from where the dimension came from); unnamed ones are never equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.patterns import RewriteRule, Var
from onnxforge.passes.fusion.base import FusionContext, RuleBasedPass
from onnxforge.pipeline.registry import register_pass

Shape = Sequence[int | str | None] | None
RESHAPE_MIN_OPSET = 5  # the target shape became an input in Reshape-5


# --- Transpose pairs --------------------------------------------------------------------------------------


def _transpose_pair(op, x):
    return op.Transpose(op.Transpose(x, _name="inner"))


def _merge_transposes(op, match, x, inner):
    """One Transpose with the composed permutation, or x itself when the two cancel out."""
    first, second = inner.inputs[0].attrs.get("perm"), match.root.attrs.get("perm")
    rank = len(first) if first is not None else len(second) if second is not None else _rank(x.shape)
    if rank is None:
        return None
    first = list(first) if first is not None else list(range(rank))[::-1]  # no perm: reverse the axes
    second = list(second) if second is not None else list(range(rank))[::-1]
    if len(first) != rank or len(second) != rank:
        return None
    perm = [first[axis] for axis in second]
    return x if perm == list(range(rank)) else op.Transpose(x, perm=perm)


def _rank(shape: Shape) -> int | None:
    return None if shape is None else len(shape)


# --- Reshape, Flatten, Squeeze, Unsqueeze ------------------------------------------------------------------

# Each reshaping op, without and with its second input (shape or axes; attributes in older opsets).
_SHAPE_SPELLINGS = [("Reshape", 1), ("Flatten", 0), ("Squeeze", 0), ("Squeeze", 1), ("Unsqueeze", 0), ("Unsqueeze", 1)]


def _shape_op(op, spelling: tuple[str, int], data, arg: str):
    kind, extra = spelling
    return getattr(op, kind)(data, *[Var(arg)] * extra)


def _chain(outer: tuple[str, int], inner: tuple[str, int]):
    def pattern(op, x):
        return _shape_op(op, outer, _shape_op(op, inner, x, "inner_arg"), "outer_arg")

    return pattern


def _single(spelling: tuple[str, int]):
    def pattern(op, x):
        return _shape_op(op, spelling, x, "arg")

    return pattern


def _known_dim(dim) -> bool:
    return (isinstance(dim, int) and dim > 0) or (isinstance(dim, str) and dim != "")


def _same_shape(a: Shape, b: Shape) -> bool:
    """True when `a` and `b` are provably equal: the same static sizes or the same named symbolic dims."""
    return a is not None and b is not None and len(a) == len(b) and all(_known_dim(d) and d == e for d, e in zip(a, b))


def _reshape_target(source: Shape, final: Shape) -> list[int] | None:
    """A constant Reshape target that turns `source` into `final`, or None if `final` is not determined.

    Static sizes stay; a symbolic dim named like the source's at the same position becomes 0 (copy it);
    one dim left unknown becomes -1, which the element count fixes.
    """
    if final is None:
        return None
    target = []
    for i, dim in enumerate(final):
        if isinstance(dim, int) and dim <= 0:
            return None  # an empty tensor: 0 would copy, and -1 is ambiguous
        if isinstance(dim, int):
            target.append(dim)
        elif _known_dim(dim) and source is not None and i < len(source) and source[i] == dim:
            target.append(0)
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 else None


def _collapse_chain(op, match, context: FusionContext, x):
    """Two reshaping ops in a row become one Reshape to the final shape (or nothing, when that is x's shape)."""
    final = match.output.shape
    if _same_shape(x.shape, final):
        return x
    target = _reshape_target(x.shape, final)
    if target is None or context.opset < RESHAPE_MIN_OPSET:
        return None
    return op.Reshape(x, op.const(np.array(target, np.int64), "shape"))


def _keeps_shape(match, x) -> bool:
    """The reshaping op provably returns x's shape: by inferred shapes, or by a constant Reshape target."""
    node = match.root
    if _same_shape(x.shape, match.output.shape):
        return True
    if node.op != "Reshape" or not isinstance(node.inputs[1], gs.Constant) or x.shape is None:
        return False
    target = np.asarray(node.inputs[1].values).reshape(-1).tolist()
    copies = not node.attrs.get("allowzero", 0)
    if len(target) != len(x.shape) or target.count(-1) > 1:
        return False
    # Every other size is x's (0 copies it), so the one -1, if any, is the remaining size: x's too.
    return all(
        want == -1 or (want == 0 and copies) or (_known_dim(have) and want == have)
        for want, have in zip(target, x.shape)
    )


def _identity(op, x):
    return x


# --- Pad into Conv and pools --------------------------------------------------------------------------------

# Pad's inputs across opsets: pads as an attribute (before 11), then as inputs with optional value and axes.
_PAD_SPELLINGS = [(), ("pads",), ("pads", "value"), ("pads", None, "axes"), ("pads", "value", "axes")]


def _padded(consumer: str, pad_inputs: tuple, weights: int):
    def pattern(op, x):
        pad = op.Pad(x, *[None if name is None else op.const(name) for name in pad_inputs], _name="padded")
        return getattr(op, consumer)(pad, *[Var(name) for name in ("w", "b")[:weights]])

    return pattern


def _pad_amounts(pad: gs.Node, x: gs.Tensor) -> tuple[np.ndarray, float] | None:
    """The constant Pad's [begins..., ends...] over all axes and its value; None if not a constant-mode Pad."""
    if pad.attrs.get("mode", "constant") != "constant":
        return None
    if len(pad.inputs) == 1:
        if "pads" not in pad.attrs:  # Pad-1 spelled it `paddings`
            return None
        return np.array(pad.attrs["pads"], np.int64), float(pad.attrs.get("value", 0.0))
    amounts = np.asarray(pad.inputs[1].values, np.int64).reshape(-1)
    value = pad.inputs[2] if len(pad.inputs) > 2 else None
    value = 0.0 if value is None or value.name == "" else float(np.asarray(value.values).reshape(-1)[0])
    if len(pad.inputs) > 3:
        rank = _rank(x.shape)
        axes = np.asarray(pad.inputs[3].values, np.int64).reshape(-1)
        if rank is None or len(amounts) != 2 * len(axes):
            return None
        full = np.zeros(2 * rank, np.int64)
        full[axes % rank], full[axes % rank + rank] = amounts[: len(axes)], amounts[len(axes) :]
        amounts = full
    return amounts, value


def _fold_pad(op, match, x, padded):
    """The consumer reads x directly, with the Pad's spatial amounts added to its own pads."""
    consumer, found = match.root, _pad_amounts(padded.inputs[0], x)
    if found is None:
        return None
    amounts, value = found
    rank = len(amounts) // 2
    begins, ends = amounts[:rank], amounts[rank:]
    if rank < 3 or begins[:2].any() or ends[:2].any() or (amounts < 0).any():
        return None  # pads batch or channels, or crops
    spatial = rank - 2
    attrs = dict(consumer.attrs)
    auto_pad = attrs.pop("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID") or len(attrs.get("kernel_shape", [0] * spatial)) != spatial:
        return None
    old = [0] * (2 * spatial) if auto_pad == "VALID" else list(attrs.get("pads", [0] * (2 * spatial)))
    if len(old) != 2 * spatial:
        return None
    attrs["pads"] = [int(p) for p in np.array(old) + np.concatenate([begins[2:], ends[2:]])]
    if not _pad_equivalent(consumer, attrs, value):
        return None
    return getattr(op, consumer.op)(x, *consumer.inputs[1:], **attrs)


def _pad_equivalent(consumer: gs.Node, attrs: dict, value: float) -> bool:
    """Whether the consumer's own padding with `attrs` reads what the explicit Pad with `value` wrote."""
    if consumer.op == "Conv":
        return value == 0.0
    kernel = list(attrs["kernel_shape"])
    if any(p >= k for p, k in zip(attrs["pads"], kernel + kernel)) or attrs.get("ceil_mode", 0):
        return False  # onnxruntime wants pads smaller than the kernel; ceil_mode drops windows in the padding
    if consumer.op == "AveragePool":
        return value == 0.0 and attrs.get("count_include_pad", 0) == 1
    # MaxPool pads with -inf; with dilations a window could hold only padding, where onnxruntime gives lowest().
    return value == -np.inf and all(d == 1 for d in attrs.get("dilations", [1]))


_PAD_CONSUMERS = [("Conv", 1), ("Conv", 2), ("AveragePool", 0), ("MaxPool", 0)]


@register_pass("simplify-layout")
class SimplifyLayout(RuleBasedPass):
    """Merge Transpose pairs, collapse Reshape/Flatten/Squeeze/Unsqueeze chains, fold Pad into Conv and pool pads."""

    needs_shapes = True
    rules = (
        RewriteRule("merge-transposes", _transpose_pair, _merge_transposes),
        RewriteRule(
            "collapse-reshapes", [_chain(a, b) for a in _SHAPE_SPELLINGS for b in _SHAPE_SPELLINGS], _collapse_chain
        ),
        RewriteRule("remove-reshape", [_single(s) for s in _SHAPE_SPELLINGS], _identity, _keeps_shape),
        RewriteRule(
            "fold-pad",
            [_padded(c, pad, weights) for c, weights in _PAD_CONSUMERS for pad in _PAD_SPELLINGS],
            _fold_pad,
        ),
    )
