"""Which outputs of a model are class scores, whose top-1 label along the last axis is a decision: the outputs the
error budget's `labels` bound reads (budget.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model

SCORE_OPS = ("Softmax", "LogSoftmax")
# Ops that only move, reshape or retype elements: the output of one applied to scores holds the same scores.
DATA_MOVING_OPS = ("Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
# How far a row's sum (Softmax) or log-sum-exp (LogSoftmax) may be from 1 or 0: float16 rounding, not a coincidence.
_NORMALIZED_WITHIN = 1e-2


def score_outputs(model: Model, outputs: Sequence[Mapping[str, np.ndarray]]) -> tuple[str, ...]:
    """The names of `model`'s outputs that are class scores: computed by a Softmax or LogSoftmax, directly or through
    ops that only move data (DATA_MOVING_OPS), of rank 2 or more, and normalized along their last axis in `outputs`
    (the model's outputs on some samples): every row sums to 1 (Softmax) or has a log-sum-exp of 0 (LogSoftmax). That
    holds where the moves kept the normalized axis last and its rows whole; where a Transpose or Reshape moved it,
    the last axis holds no labels and the output is not scores."""
    names = []
    for tensor in model.graph.outputs:
        op = _scoring_op(tensor)
        if op is not None and outputs and all(_normalized(run.get(tensor.name), op) for run in outputs):
            names.append(tensor.name)
    return tuple(names)


def _scoring_op(tensor: gs.Tensor) -> str | None:
    """The Softmax or LogSoftmax `tensor` is computed by, through data-moving ops; None when there is none."""
    while tensor.inputs:
        node = tensor.inputs[0]
        if node.domain not in (None, "", "ai.onnx") or not node.inputs:
            return None
        if node.op in SCORE_OPS:
            return node.op
        if node.op not in DATA_MOVING_OPS:
            return None
        tensor = node.inputs[0]
    return None


def _normalized(values: np.ndarray | None, op: str) -> bool:
    if values is None:
        return False
    values = np.asarray(values)
    if values.dtype.kind != "f" or values.ndim < 2 or values.shape[-1] < 2 or values.size == 0:
        return False
    rows = values.astype(np.float64).reshape(-1, values.shape[-1])
    if op == "Softmax":
        totals = rows.sum(axis=-1)
        return bool(np.all(np.abs(totals - 1) <= _NORMALIZED_WITHIN))
    peak = rows.max(axis=-1, keepdims=True)
    totals = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=-1))
    return bool(np.all(np.abs(totals) <= _NORMALIZED_WITHIN))
