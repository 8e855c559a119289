"""What a shape tensor holds, entry by entry, and the shape a Reshape to it gives: symbolic shape reasoning.

Exporters with dynamic axes write a Reshape's target as arithmetic on `Shape` (Shape -> Gather -> Unsqueeze ->
Concat, with Div for a head size) or with 0 and -1 entries. `shape_value` reads such a computation back into
a list of dims, each an int, a symbolic dim name (the name shape inference gave a dimension: two dims with
the same name are the same length) or None (unknown); `reshaped` applies Reshape's rules to symbolic dims.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

Dim = int | str | None
MAX_DEPTH = 32  # shape arithmetic is a handful of nodes deep; a deeper chain is not a shape computation


def dims_of(tensor: gs.Tensor) -> list[Dim] | None:
    """The shape of a tensor as symbolic dims, or None without a rank.

    A dim shape inference left unknown or unnamed gets a name of its own, `?tensor[axis]`: equal only to
    itself, which is still worth knowing (a Shape of this tensor gives back exactly that dim).
    """
    if tensor.shape is None:
        return None
    return [
        d if (isinstance(d, int) and d >= 0) or (isinstance(d, str) and d) else f"?{tensor.name}[{axis}]"
        for axis, d in enumerate(tensor.shape)
    ]


def is_unnamed(dim: Dim) -> bool:
    """Whether a dim is one `dims_of` named for lack of a name (not to be written into a model)."""
    return isinstance(dim, str) and dim.startswith("?")


def shape_value(tensor: gs.Tensor, depth: int = 0) -> list[Dim] | None:
    """The entries of a 0-D or 1-D integer tensor computed from shapes and constants; None if not readable."""
    if depth > MAX_DEPTH or tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if values.dtype.kind not in "iu" or values.ndim > 1 or values.size > 16:
            return None
        return [int(v) for v in values.reshape(-1)]
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    inputs = [shape_value(t, depth + 1) if t is not None and t.name else None for t in node.inputs]
    op = node.op
    if op == "Shape":
        dims = dims_of(node.inputs[0])
        if dims is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        return dims[start:end]
    if op == "Constant":
        value = node.attrs.get("value")
        return shape_value(value, depth + 1) if isinstance(value, gs.Constant) else None
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten") and inputs and inputs[0] is not None:
        # The rank changes, the entries do not (a scalar and a [1] hold the same one value).
        return inputs[0] if op != "Cast" or _is_integer(node.attrs.get("to")) else None
    if op == "Concat" and inputs and all(v is not None for v in inputs):
        return [d for v in inputs for d in v]
    if op == "Gather" and len(inputs) == 2 and inputs[0] is not None and isinstance(node.inputs[1], gs.Constant):
        if node.attrs.get("axis", 0) != 0:
            return None
        data, indices = inputs[0], np.asarray(node.inputs[1].values).reshape(-1)
        if any(not -len(data) <= int(i) < len(data) for i in indices):
            return None
        return [data[int(i)] for i in indices]
    if op == "Slice" and inputs and inputs[0] is not None and all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        starts, ends = (int(np.asarray(t.values).reshape(-1)[0]) for t in node.inputs[1:3])
        steps = int(np.asarray(node.inputs[4].values).reshape(-1)[0]) if len(node.inputs) > 4 else 1
        return inputs[0][starts:ends:steps]
    if op in ("Div", "Mul", "Add", "Sub") and len(inputs) == 2 and all(v is not None for v in inputs):
        return _arithmetic(op, inputs[0], inputs[1])
    return None


def _is_integer(to: int | None) -> bool:
    return to in (6, 7, 12, 13)  # onnx.TensorProto.INT32, INT64, UINT32, UINT64


def _arithmetic(op: str, a: list[Dim], b: list[Dim]) -> list[Dim] | None:
    """Element-wise integer arithmetic on entries; a symbolic entry survives only `x * 1`, `x / 1`, `x + 0`."""
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    width = max(len(a), len(b))
    a, b = a * width if len(a) == 1 else a, b * width if len(b) == 1 else b
    out: list[Dim] = []
    for x, y in zip(a, b):
        if isinstance(x, int) and isinstance(y, int):
            if op == "Div" and (y == 0 or x % y):  # onnx's integer Div truncates; keep to exact quotients
                return None
            out.append(x // y if op == "Div" else x * y if op == "Mul" else x + y if op == "Add" else x - y)
        elif (op in ("Div", "Mul") and y == 1) or (op in ("Add", "Sub") and y == 0):
            out.append(x)
        elif op in ("Mul", "Add") and x == (1 if op == "Mul" else 0):
            out.append(y)
        else:
            out.append(None)
    return out


def reshaped(dims: Sequence[Dim], target: Sequence[Dim], allowzero: int = 0) -> list[Dim] | None:
    """The dims a Reshape of a tensor with `dims` to `target` gives; None when they cannot be told.

    A 0 entry copies the input's dim (unless allowzero); one -1 entry takes what is left, which is found
    by cancelling equal symbolic dims and dividing what remains, so [B, S, 32] to [0, 0, 4, -1] gives
    [B, S, 4, 8] and [B, S, 4, 8] to [B, S, -1] gives [B, S, 32].
    """
    out: list[Dim] = []
    for i, entry in enumerate(target):
        if entry == 0 and not allowzero:
            if i >= len(dims):
                return None
            entry = dims[i]
        elif isinstance(entry, int) and entry < -1:
            return None
        out.append(entry)
    holes = [i for i, d in enumerate(out) if d == -1]
    if len(holes) > 1 or any(d is None for d in dims):
        return None
    if holes:
        known = [d for i, d in enumerate(out) if i != holes[0]]
        if any(d is None for d in known):
            return None
        left = quotient(dims, known)
        if left is None:
            return None
        out[holes[0]] = left
    return out


def quotient(numerator: Sequence[Dim], denominator: Sequence[Dim]) -> Dim:
    """prod(numerator) / prod(denominator) when equal symbolic dims cancel and the rest divides; else None."""
    top = Counter(d for d in numerator if isinstance(d, str))
    bottom = Counter(d for d in denominator if isinstance(d, str))
    if any(d is None for d in (*numerator, *denominator)):
        return None
    common = top & bottom
    top, bottom = top - common, bottom - common
    if bottom or sum(top.values()) > 1:
        return None
    value = int(np.prod([d for d in numerator if isinstance(d, int)], dtype=np.int64))
    divisor = int(np.prod([d for d in denominator if isinstance(d, int)], dtype=np.int64))
    if divisor == 0 or value % divisor:
        return None
    if top:
        return next(iter(top)) if value // divisor == 1 else None
    return value // divisor


def refine_reshapes(graph: gs.Graph) -> int:
    """Give Reshape outputs the constant dims symbolic reasoning finds where inference left a symbol (a head
    size computed as hidden // heads, say); how many tensors changed. Inferring shapes again spreads them."""
    changed = 0
    for node in graph.nodes:
        if node.op != "Reshape" or len(node.inputs) < 2 or node.outputs[0].shape is None:
            continue
        before, target = dims_of(node.inputs[0]), shape_value(node.inputs[1])
        if before is None or target is None:
            continue
        after = reshaped(before, target, node.attrs.get("allowzero", 0))
        current = node.outputs[0].shape
        if after is None or len(after) != len(current):
            continue
        refined = [a if isinstance(a, int) and not isinstance(c, int) else c for a, c in zip(after, current)]
        if refined != list(current):
            node.outputs[0].shape = refined
            changed += 1
    return changed


def same_dims(a: Sequence[Dim] | None, b: Sequence[Dim] | None) -> bool:
    """Provably equal: the same rank and each dim the same int or the same symbolic name (never unknown)."""
    return a is not None and b is not None and len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


__all__ = ["Dim", "dims_of", "is_unnamed", "quotient", "refine_reshapes", "reshaped", "same_dims", "shape_value"]
