"""What a shape tensor holds, entry by entry, and the shape a Reshape to it gives: symbolic shape reasoning.

Exporters with dynamic axes write a Reshape's target as arithmetic on `Shape` (Shape -> Gather -> Unsqueeze ->
Concat, with Div for a head size) or with 0 and -1 entries. `shape_value` reads such a computation back into
a list of dims, each an int, a symbolic dim name (the name shape inference gave a dimension: two dims with
the same name are the same length) or None (unknown); `reshaped` applies Reshape's rules to symbolic dims.
Arithmetic on a name by constants is an expression in one canonical spelling, `((s71//10)+-1)`, which is also
how `dims_of` reads a dim the dynamo exporter named with that expression (`((s71//10)) - 1`), so both compare
equal. `traced_dims` reads through the ops that computed a tensor where shape inference left its dims unknown.
"""

from __future__ import annotations

import functools
import re
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
        d if isinstance(d, int) and d >= 0 else canonical_dim(d) if isinstance(d, str) and d
        else f"?{tensor.name}[{axis}]"
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
    if op == "Equal" and len(inputs) == 2 and all(v is not None for v in inputs):
        return _equal(inputs[0], inputs[1])
    if op == "Where" and len(inputs) == 3 and all(v is not None for v in inputs):
        return _where(*inputs)
    if op == "ConstantOfShape" and inputs and inputs[0] is not None:
        return _constant_of_shape(inputs[0], node.attrs.get("value"))
    return None


def _broadcast_entries(*entries: list[Dim]) -> list[list[Dim]] | None:
    """The entries of element-wise operands at equal length (a single entry repeats); None if they differ."""
    width = max(len(e) for e in entries)
    if any(len(e) not in (1, width) for e in entries):
        return None
    return [e * width if len(e) == 1 else e for e in entries]


def _equal(a: list[Dim], b: list[Dim]) -> list[Dim] | None:
    """1 or 0 per entry where it is known: a dim (never negative) is not -1, a name equals itself."""
    entries = _broadcast_entries(a, b)
    if entries is None:
        return None
    out: list[Dim] = []
    for x, y in zip(*entries):
        if isinstance(x, int) and isinstance(y, int):
            out.append(int(x == y))
        elif isinstance(x, str) and x == y:
            out.append(1)
        elif _is_dim_name(x) and isinstance(y, int) and y < 0 or _is_dim_name(y) and isinstance(x, int) and x < 0:
            out.append(0)
        else:
            out.append(None)
    return out


def _is_dim_name(entry: Dim) -> bool:
    return isinstance(entry, str) and not _is_expression(entry)


def _where(condition: list[Dim], a: list[Dim], b: list[Dim]) -> list[Dim] | None:
    """The entry of `a` where the condition is 1, of `b` where 0; None where the condition is unknown.
    (torch writes `expand(B, -1, S, T)` as Where(target == -1, 1, target).)"""
    entries = _broadcast_entries(condition, a, b)
    if entries is None:
        return None
    return [None if c is None else x if c else y for c, x, y in zip(*entries)]


def _constant_of_shape(shape: list[Dim], value: gs.Constant | None) -> list[Dim] | None:
    """A 1-D ConstantOfShape of integers: its value repeated (the default, float 0, is no shape value)."""
    values = None if value is None else np.asarray(value.values).reshape(-1)
    if values is None or values.dtype.kind not in "iu" or len(shape) != 1 or not isinstance(shape[0], int):
        return None
    return [int(values[0])] * shape[0] if shape[0] <= 16 else None


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
        elif x is None or y is None:
            out.append(None)
        else:
            out.append(_symbolic(op, x, y))
    return out


def _symbolic(op: str, x: Dim, y: Dim) -> Dim:
    """x op y with a symbolic operand, as a canonical expression; None for a Div that may not be a floor."""
    if op == "Add":
        return _sum(x, y)
    if op == "Sub":
        return _sum(x, -y if isinstance(y, int) else _product(-1, y))
    if op == "Mul":
        return _product(x, y)
    if y == 1:
        return x
    # onnx's integer Div truncates: the floor of a dim (never negative) by a positive constant, as exporters name it.
    if isinstance(y, int) and y > 0 and isinstance(x, str) and not _is_expression(x):
        return _floor_div(x, y)
    return None


def _floor_div(x: Dim, y: Dim) -> Dim:
    if isinstance(x, int) and isinstance(y, int) and y > 0:
        return x // y
    return x if y == 1 else f"({x}//{y})"


def _sum(x: Dim, y: Dim) -> Dim:
    if isinstance(x, int) and isinstance(y, int):
        return x + y
    if x == 0 or y == 0:
        return y if x == 0 else x
    first, second = sorted((str(x), str(y)))
    return f"({first}+{second})"


def _product(x: Dim, y: Dim) -> Dim:
    if isinstance(x, int) and isinstance(y, int):
        return x * y
    if 0 in (x, y):
        return 0
    if x == 1 or y == 1:
        return y if x == 1 else x
    first, second = sorted((str(x), str(y)))
    return f"({first}*{second})"


def _is_expression(dim: Dim) -> bool:
    """Whether a symbolic dim is arithmetic on names (which, unlike a dim, may be negative)."""
    return isinstance(dim, str) and dim.startswith("(")


_TOKEN = re.compile(r"\s*(\d+|[A-Za-z_][A-Za-z_0-9.]*|//|[-+*()])")


@functools.lru_cache(maxsize=4096)
def canonical_dim(name: str) -> Dim:
    """A dim name that is an expression (the dynamo exporter names dims `((s71//10)) - 1`) written the way
    `shape_value` writes the arithmetic that computes it, so the two compare equal; other names as they are."""
    if not re.search(r"[()+*/]| - ", name):
        return name
    tokens, position = [], 0
    while position < len(name):
        token = _TOKEN.match(name, position)
        if token is None:
            return name
        tokens.append(token.group(1))
        position = token.end()
    parsed = _parse_sum(tokens, 0)
    return parsed[0] if parsed is not None and parsed[1] == len(tokens) else name


def _parse_sum(tokens: list[str], at: int) -> tuple[Dim, int] | None:
    term = _parse_product(tokens, at)
    while term is not None and term[1] < len(tokens) and tokens[term[1]] in ("+", "-"):
        sign, right = tokens[term[1]], _parse_product(tokens, term[1] + 1)
        if right is None:
            return None
        term = (_symbolic("Add" if sign == "+" else "Sub", term[0], right[0]), right[1])
    return term


def _parse_product(tokens: list[str], at: int) -> tuple[Dim, int] | None:
    factor = _parse_factor(tokens, at)
    while factor is not None and factor[1] < len(tokens) and tokens[factor[1]] in ("*", "//"):
        operator, right = tokens[factor[1]], _parse_factor(tokens, factor[1] + 1)
        if right is None:
            return None
        combine = _product if operator == "*" else _floor_div
        factor = (combine(factor[0], right[0]), right[1])
    return factor


def _parse_factor(tokens: list[str], at: int) -> tuple[Dim, int] | None:
    if at >= len(tokens):
        return None
    token = tokens[at]
    if token.isdigit():
        return int(token), at + 1
    if token == "(":
        inner = _parse_sum(tokens, at + 1)
        if inner is None or inner[1] >= len(tokens) or tokens[inner[1]] != ")":
            return None
        return inner[0], inner[1] + 1
    if token[0].isalpha() or token[0] == "_":
        return token, at + 1
    return None


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


ELEMENTWISE_OPS = {"Add", "And", "Cast", "Div", "Equal", "Greater", "Less", "Mul", "Not", "Or", "Sub", "Where"}


def traced_dims(tensor: gs.Tensor, depth: int = 0) -> list[Dim] | None:
    """The dims of a tensor, with those shape inference could not tell read through the ops that computed it:
    Expand (its target read by `shape_value`) and element-wise ops broadcast their operands, Gather puts the
    indices' dims in place of its axis, Slice keeps the dims of the axes it does not slice. None without a rank.

    A dim found that way replaces the one inference gave (often an invented `unk__N`). Where operands name a
    dim differently it stays as inference left it, since either may be 1: only 1s, equal names and constants
    are told apart, which is what a mask's head axis or an embedding's batch of 1 needs.
    """
    dims = dims_of(tensor)
    if dims is not None and all(isinstance(d, int) for d in dims):
        return dims
    if depth > MAX_DEPTH or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return dims
    found = _dims_from_inputs(tensor.inputs[0], depth)
    if found is None or dims is None:
        return found if dims is None else dims
    if len(dims) != len(found):
        return dims
    return [d if f is None or is_unnamed(f) else f for d, f in zip(dims, found)]


def _dims_from_inputs(node: gs.Node, depth: int) -> list[Dim] | None:
    """The output dims of `node` from its inputs' traced dims; None where `traced_dims` reads no rule for it."""
    if node.op == "Gather" and len(node.inputs) == 2:
        data, indices = traced_dims(node.inputs[0], depth + 1), traced_dims(node.inputs[1], depth + 1)
        axis = node.attrs.get("axis", 0)
        if data is None or indices is None or not -len(data) <= axis < len(data):
            return None
        axis %= len(data)
        return [*data[:axis], *indices, *data[axis + 1 :]]
    if node.op == "Slice" and len(node.inputs) >= 4 and isinstance(node.inputs[3], gs.Constant):
        data = traced_dims(node.inputs[0], depth + 1)
        if data is None:
            return None
        sliced = {int(a) % len(data) for a in np.asarray(node.inputs[3].values).reshape(-1)}
        return [None if axis in sliced else d for axis, d in enumerate(data)]
    if node.op == "Unsqueeze":
        return _unsqueezed(node, depth)
    if node.op == "Range" and len(node.inputs) == 3:  # Range(0, n, 1) holds n values
        start, limit, delta = (shape_value(t) for t in node.inputs)
        return limit if start == [0] and delta == [1] and limit is not None and len(limit) == 1 else None
    if node.op == "Expand" and len(node.inputs) == 2:
        operands = [traced_dims(node.inputs[0], depth + 1), shape_value(node.inputs[1])]
    elif node.op in ELEMENTWISE_OPS:
        operands = [traced_dims(t, depth + 1) for t in node.inputs]
    else:
        return None
    if any(o is None for o in operands):
        return None
    rank = max(len(o) for o in operands)
    aligned = [[1] * (rank - len(o)) + list(o) for o in operands]
    return [_broadcast_dim([o[axis] for o in aligned]) for axis in range(rank)]


def _unsqueezed(node: gs.Node, depth: int) -> list[Dim] | None:
    """The dims of an Unsqueeze's output: its input's with 1s at the axes (an input from opset 13, an attribute
    before)."""
    data = traced_dims(node.inputs[0], depth + 1)
    axes = node.inputs[1] if len(node.inputs) > 1 else None
    axes = np.asarray(axes.values).reshape(-1) if isinstance(axes, gs.Constant) else node.attrs.get("axes")
    if data is None or axes is None:
        return None
    rank = len(data) + len(axes)
    ones = {int(a) % rank for a in axes}
    rest = iter(data)
    return [1 if axis in ones else next(rest) for axis in range(rank)]


def _broadcast_dim(entries: list[Dim]) -> Dim:
    """The dim operands broadcast to along one axis: the one that is not 1, when that is one dim."""
    others = {e for e in entries if e != 1}
    if not others:
        return 1
    if len(others) == 1 and None not in others and not any(is_unnamed(e) for e in others):
        return others.pop()
    ints = {e for e in others if isinstance(e, int)}
    return ints.pop() if len(ints) == 1 else None  # a named dim beside a constant is that constant (or 1)


def same_dims(a: Sequence[Dim] | None, b: Sequence[Dim] | None) -> bool:
    """Provably equal: the same rank and each dim the same int or the same symbolic name (never unknown)."""
    return a is not None and b is not None and len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


__all__ = [
    "Dim", "canonical_dim", "dims_of", "is_unnamed", "quotient", "refine_reshapes", "reshaped", "same_dims",
    "shape_value", "traced_dims",
]
