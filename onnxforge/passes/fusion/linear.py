"""Fuse MatMul by a constant 2-D weight plus a constant bias into one Gemm, where the MatMul's input is 2-D."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.patterns import RewriteRule
from onnxforge.passes.fusion.base import FusionContext, RuleBasedPass
from onnxforge.pipeline.registry import register_pass

GEMM_MIN_OPSET = 7  # Gemm before 7 broadcasts its bias only with broadcast=1


def _matmul_add(op, a):
    return op.Add(op.MatMul(a, op.const("w")), op.const("bias"))


def _is_2d_linear(match, context: FusionContext, a: gs.Tensor, w: gs.Constant, bias: gs.Constant) -> bool:
    """A is known to be 2-D (on [batch, seq, hidden] MatMul must stay), W is 2-D, the bias is per column."""
    weights, shift = np.asarray(w.values), np.asarray(bias.values)
    if context.opset < GEMM_MIN_OPSET or a.shape is None or len(a.shape) != 2 or weights.ndim != 2:
        return False
    if weights.dtype != np.float32 or shift.dtype != np.float32:  # MatMul makes A the same type as W
        return False
    # The bias must not widen the output: it broadcasts to [1, M] (scalar, [1], [M], [1, 1] or [1, M]).
    padded = (1,) * (2 - shift.ndim) + shift.shape if shift.ndim <= 2 else None
    return padded is not None and padded[0] == 1 and padded[1] in (1, weights.shape[1])


def _gemm(op, a, w, bias):
    return op.Gemm(a, w, bias)


@register_pass("fuse-matmul-add")
class FuseMatMulAdd(RuleBasedPass):
    """Fuse MatMul(A, W) + bias into Gemm where A is 2-D and W and the bias are constants."""

    needs_shapes = True
    rules = (RewriteRule("fuse-matmul-add", _matmul_add, _gemm, _is_2d_linear),)
