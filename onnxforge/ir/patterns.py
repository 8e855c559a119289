"""Declarative rewrite rules: a pattern written with ONNX ops, an optional condition, and a replacement.

A pattern is a function of `op` (a builder) and pattern variables; it reads like the math it matches:

    def erf_gelu(op, x):
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Div(x, SQRT2)), 1.0))

    def fused_gelu(op, x):
        return op.Gelu(x)

    rule = RewriteRule("gelu-erf", erf_gelu, fused_gelu)

Numbers in a pattern match constants of that value (any shape that broadcasts to a single value);
`op.const("w")` matches any constant and binds it as `w`; a parameter of the pattern function matches
any value; `op.either(a, b)` matches whichever of its alternatives matches, tried in order (an optional
node `f` around `x` is `op.either(f(x), x)`). Commutative ops (Add, Mul, ...) match their inputs in either
order. The replacement gets the same builder vocabulary and builds real nodes; `op.const(array)` makes a
weight. One matcher serves all.

Inner values of a match are removed with it, so none may be read outside the pattern, unless the pattern
marks it `_shared=True` (with a `_name`): the replacement then returns `(output, {name: new_value})` to
give such a value its replacement wherever it is still read (`match.used_outside(name)` says whether).
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.edit import replace_uses, unique_name
from onnxforge.ir.ops import ONNX_DOMAINS

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal", "Mean"}
# The ops of shape arithmetic (a Reshape target computed from Shape) and how deep it goes.
SHAPE_ARITHMETIC = {"Shape", "Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Cast", "Div", "Mul", "Add", "Sub"}
SHAPE_ARITHMETIC_DEPTH = 8
NEAR_MISS_NODES = 3  # a match of this many nodes declined without a reason is still a near miss for --explain


# --- the pattern side ----------------------------------------------------------------------------------


class PatternValue:
    """A value in a pattern: an input variable, a constant, a literal number, or the output of an op."""


@dataclass(eq=False)
class Var(PatternValue):
    """Matches any value; the same name must match the same tensor everywhere in the pattern."""

    name: str


@dataclass(eq=False)
class ConstVar(PatternValue):
    """Matches a constant (weight) and binds it by name."""

    name: str


@dataclass(eq=False)
class Literal(PatternValue):
    """Matches a constant all of whose elements are `value` as float32 holds it (see `is_exactly`)."""

    value: float


@dataclass(eq=False)
class OpValue(PatternValue):
    """The `index`-th output of an op node with the given type, inputs and attributes."""

    op: str
    inputs: list[PatternValue | None]
    attrs: dict[str, Any]
    domain: str | None
    index: int = 0
    outputs: int = 1
    binding: str | None = None
    shared: bool = False


@dataclass(eq=False)
class Either(PatternValue):
    """Matches the first of its alternatives that matches (with the rest of the pattern)."""

    alternatives: list[PatternValue]


class PatternBuilder:
    """The `op` a pattern function receives: `op.Relu(x)`, `op.Gelu(x, approximate="tanh")`, `op.const("w")`.

    Keyword `_domain` sets the op's domain, `_outputs` its output count (a tuple of values is returned),
    `_name` binds the matched node's output under that name, `_shared=True` lets that output also be read
    outside the pattern. An attribute given as a callable is a predicate.
    """

    def const(self, name: str) -> ConstVar:
        return ConstVar(name)

    def either(self, *alternatives: Any) -> Either:
        return Either([_as_pattern(a) for a in alternatives])

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_"):
            raise AttributeError(op)

        def make(
            *inputs,
            _domain: str | None = None,
            _outputs: int = 1,
            _name: str | None = None,
            _shared: bool = False,
            **attrs,
        ):
            if _shared and not _name:
                raise TypeError(f"a shared {op} needs a _name")
            values = [_as_pattern(v) for v in inputs]
            first = OpValue(op, values, attrs, _domain, 0, _outputs, _name, _shared)
            if _outputs == 1:
                return first
            return tuple(
                first if i == 0 else OpValue(op, values, attrs, _domain, i, _outputs, None) for i in range(_outputs)
            )

        return make


def _as_pattern(value: Any) -> PatternValue | None:
    if value is None or isinstance(value, PatternValue):
        return value
    if isinstance(value, (int, float, np.floating, np.integer)):
        return Literal(float(value))
    raise TypeError(f"a pattern input must be a pattern value or a number, not {type(value).__name__}")


def trace_pattern(fn: Callable[..., PatternValue]) -> tuple[OpValue, list[str]]:
    """Run a pattern function on fresh variables; return its root op and the variables' names."""
    names = list(inspect.signature(fn).parameters)[1:]
    root = fn(PatternBuilder(), *(Var(name) for name in names))
    if not isinstance(root, OpValue):
        raise TypeError(f"pattern {fn.__name__} must return the output of an op")
    return root, names


# --- matching -------------------------------------------------------------------------------------------


@dataclass
class Match:
    """A place where a pattern matched: the bound values, the matched nodes, and the graph they are in."""

    graph: gs.Graph
    root: gs.Node
    output: gs.Tensor
    bindings: dict[str, Any]
    nodes: list[gs.Node] = field(default_factory=list)
    shared: tuple[str, ...] = ()

    def value(self, name: str) -> np.ndarray:
        """The constant values bound to `name`."""
        return np.asarray(self.bindings[name].values)

    def is_constant(self, name: str) -> bool:
        return isinstance(self.bindings[name], gs.Constant)

    def used_outside(self, name: str) -> bool:
        """Whether the value bound to `name` is read by a node outside the match or is a graph output."""
        tensor = self.bindings[name]
        inside = {id(n) for n in self.nodes}
        return tensor in self.graph.outputs or any(id(c) not in inside for c in tensor.outputs)


def match_pattern(root: OpValue, node: gs.Node, graph: gs.Graph) -> Match | None:
    """Match the pattern whose output is `root` against the output of `node` in `graph`."""
    if len(node.outputs) <= root.index:
        return None
    output = node.outputs[root.index]
    for bindings, nodes in _match_value(root, output, {}, []):
        # Walked only once the pattern matched: most nodes tried match nothing, and big patterns cost the walk.
        shared = tuple(name for name in _shared_names(root) if name in bindings)  # an `either` may not bind all
        if _self_contained(nodes, [output, *(bindings[name] for name in shared)], graph):
            return Match(graph, node, output, bindings, nodes, shared)
    return None


def _shared_names(pattern: PatternValue | None) -> Iterator[str]:
    """The names of the values a pattern marks as shared (each once)."""
    seen: set[str] = set()
    stack = [pattern]
    while stack:
        value = stack.pop()
        if isinstance(value, Either):
            stack.extend(value.alternatives)
        elif isinstance(value, OpValue):
            if value.shared and value.binding not in seen:
                seen.add(value.binding)
                yield value.binding
            stack.extend(value.inputs)


def _match_value(
    pattern: PatternValue | None, tensor: gs.Tensor, bindings: dict, nodes: list
) -> Iterator[tuple[dict, list]]:
    """Yield every (bindings, matched nodes) under which `tensor` matches `pattern`."""
    if pattern is None:
        if tensor is None or tensor.name == "":
            yield bindings, nodes
        return
    if tensor is None or tensor.name == "":
        return
    if isinstance(pattern, Either):
        for alternative in pattern.alternatives:
            yield from _match_value(alternative, tensor, bindings, nodes)
        return
    if isinstance(pattern, (Var, ConstVar)):
        if isinstance(pattern, ConstVar) and not isinstance(tensor, gs.Constant):
            return
        bound = bindings.get(pattern.name)
        if bound is None:
            yield {**bindings, pattern.name: tensor}, nodes
        elif bound is tensor:
            yield bindings, nodes
        return
    if isinstance(pattern, Literal):
        if isinstance(tensor, gs.Constant) and _all_equal(tensor, pattern.value):
            yield bindings, nodes
        return
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return
    node = tensor.inputs[0]
    if not _node_fits(pattern, node, tensor):
        return
    if pattern.binding:
        if pattern.binding in bindings and bindings[pattern.binding] is not tensor:
            return
        bindings = {**bindings, pattern.binding: tensor}
    if not any(n is node for n in nodes):
        nodes = [*nodes, node]
    inputs = list(node.inputs)
    while inputs and (inputs[-1] is None or inputs[-1].name == "") and len(inputs) > len(pattern.inputs):
        inputs.pop()
    if len(inputs) != len(pattern.inputs):
        return
    orders = [pattern.inputs]
    if pattern.op in COMMUTATIVE and len(pattern.inputs) == 2:
        orders.append(pattern.inputs[::-1])
    for order in orders:
        yield from _match_inputs(order, inputs, bindings, nodes)


def _match_inputs(patterns: Sequence, tensors: Sequence, bindings: dict, nodes: list) -> Iterator[tuple[dict, list]]:
    if not patterns:
        yield bindings, nodes
        return
    for bound, matched in _match_value(patterns[0], tensors[0], bindings, nodes):
        yield from _match_inputs(patterns[1:], tensors[1:], bound, matched)


def _node_fits(pattern: OpValue, node: gs.Node, tensor: gs.Tensor) -> bool:
    if node.op != pattern.op:
        return False
    if pattern.domain is None:
        if node.domain not in ONNX_DOMAINS:
            return False
    elif node.domain != pattern.domain:
        return False
    if len(node.outputs) != pattern.outputs and pattern.outputs != 1:
        return False
    if pattern.index >= len(node.outputs) or node.outputs[pattern.index] is not tensor:
        return False
    for key, expected in pattern.attrs.items():
        actual = node.attrs.get(key)
        if callable(expected):
            if not expected(actual):
                return False
        elif actual != expected and not (
            isinstance(actual, (list, tuple)) and list(actual) == list(expected)
        ):
            return False
    return True


def _all_equal(tensor: gs.Constant, value: float) -> bool:
    return np.size(tensor.values) <= 64 and is_exactly(tensor.values, value)  # a literal is a few numbers


def is_exactly(values: Any, exact: float) -> bool:
    """Whether `values` all are `exact` as float32 holds it: within one float32 step of it.

    Not a looser tolerance: a fused op computes with its own float32 constant, so a constant near it (sqrt(2)
    rounded to float16, 1.4140625, as fp16 models widened to float32 carry; 0.0447 for 0.044715) would change
    the outputs. Exporters write a constant as float32 or float64 of the same number; both are within the step.
    """
    values = np.asarray(values)
    if values.size == 0 or values.dtype.kind not in "fiu":
        return False
    step = float(np.spacing(np.float32(abs(exact))))
    return bool(np.all(np.abs(values.astype(np.float64) - exact) <= step))


def _self_contained(nodes: list[gs.Node], exits: list[gs.Tensor], graph: gs.Graph) -> bool:
    """Only the pattern's output and shared values may be read outside the matched nodes (the rest is removed),
    except by shape arithmetic that only the matched nodes use (a Reshape target computed from a Shape of an
    inner value, as exporters with dynamic axes write): it dies with the match."""
    inside = {id(n) for n in nodes}
    graph_outputs = {id(t) for t in graph.outputs}
    allowed = {id(t) for t in exits}
    for node in nodes:
        for tensor in node.outputs:
            if id(tensor) in allowed:
                continue
            if id(tensor) in graph_outputs:
                return False
            if any(id(c) not in inside and not _feeds_only(c, inside, graph_outputs) for c in tensor.outputs):
                return False
    return True


def _feeds_only(reader: gs.Node, inside: set[int], graph_outputs: set[int], depth: int = 0) -> bool:
    """Whether `reader` is a Shape whose value, through shape arithmetic, is read by the matched nodes only."""
    if depth == 0 and reader.op != "Shape":
        return False
    if depth > SHAPE_ARITHMETIC_DEPTH or reader.op not in SHAPE_ARITHMETIC:
        return False
    for tensor in reader.outputs:
        if id(tensor) in graph_outputs:
            return False
        for consumer in tensor.outputs:
            if id(consumer) not in inside and not _feeds_only(consumer, inside, graph_outputs, depth + 1):
                return False
    return True


# --- the replacement side --------------------------------------------------------------------------------


class GraphBuilder:
    """The `op` a replacement function receives: it creates real nodes (`op.Gemm(a, b, c, transB=1)`)
    and weights (`op.const(array, "name")`), named after the node being replaced."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[gs.Node] = []
        self._taken: set[str] = set()

    def const(self, values: Any, name: str = "const") -> gs.Constant:
        return gs.Constant(self._name(f"{self.prefix}/{name}"), np.asarray(values))

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_"):
            raise AttributeError(op)

        def make(*inputs, _domain: str | None = None, _outputs: int = 1, **attrs):
            inputs = [self._tensor(v) for v in inputs]
            outputs = [gs.Variable(self._name(f"{self.prefix}/{op}_out")) for _ in range(_outputs)]
            node = gs.Node(op, self._name(f"{self.prefix}/{op}"), attrs, inputs, outputs, domain=_domain)
            self.nodes.append(node)
            return outputs[0] if _outputs == 1 else tuple(outputs)

        return make

    def _tensor(self, value: Any) -> gs.Tensor:
        if value is None:
            return gs.Variable.empty()
        if isinstance(value, gs.Tensor):
            return value
        return self.const(np.asarray(value, dtype=np.float32 if isinstance(value, float) else None))

    def _name(self, base: str) -> str:
        name = unique_name(self.graph, base)
        while name in self._taken:
            name = unique_name(self.graph, f"{base}_{len(self._taken)}")
        self._taken.add(name)
        return name


# --- rules ---------------------------------------------------------------------------------------------


Condition = Callable[..., bool]


@dataclass(frozen=True)
class Declined:
    """What a condition or replacement returns to decline a match and say why; false, like None and False."""

    reason: str

    def __bool__(self) -> bool:
        return False


def decline(reason: str) -> Declined:
    """Decline this match, with the reason `--explain` shows (a replacement may also return None: no reason)."""
    return Declined(reason)


@dataclass
class NearMisses:
    """Places where a rule's pattern matched but a condition or the replacement declined, by (rule, reason)."""

    places: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, rule: str, reason: str, node: str) -> None:
        names = self.places.setdefault((rule, reason), [])
        if node not in names:
            names.append(node)

    def lines(self, shown: int = 3) -> list[str]:
        """One line per (rule, reason): how many places, the first few node names, and the reason."""
        lines = []
        for (rule, reason), nodes in sorted(self.places.items()):
            where = ", ".join(nodes[:shown]) + (f", ... ({len(nodes) - shown} more)" if len(nodes) > shown else "")
            count = f"{len(nodes)} place{'s' if len(nodes) != 1 else ''}"
            lines.append(f"{rule} declined at {count} ({where}): {reason}")
        return lines

    def __bool__(self) -> bool:
        return bool(self.places)


@dataclass
class RewriteRule:
    """Where `pattern` matches and `condition(match, **bindings)` holds, build `replacement(op, **bindings)`.

    Either function may also take `match` (the Match) and `context` (what `apply_rules` was given).

    `patterns` may list several spellings of the same math (exporters differ); each is tried in turn.
    A replacement returning None declines the match; one that returns `(output, {name: value})` gives
    shared values their replacements (a shared value still read outside and not given declines the match).
    """

    name: str
    pattern: Callable[..., PatternValue] | Sequence[Callable[..., PatternValue]]
    replacement: Callable[..., Any]
    condition: Condition | None = None
    _traced: list[tuple[OpValue, list[str]]] = field(default_factory=list, init=False, repr=False)

    def roots(self) -> list[tuple[OpValue, list[str]]]:
        if not self._traced:
            patterns = self.pattern if isinstance(self.pattern, (list, tuple)) else [self.pattern]
            self._traced = [trace_pattern(p) for p in patterns]
        return self._traced

    def try_rewrite(
        self, node: gs.Node, graph: gs.Graph, context: Any = None, misses: NearMisses | None = None, dry: bool = False
    ) -> bool:
        """Rewrite at `node` if a pattern of this rule matches there; True if the graph changed (or, `dry`,
        would change: nothing is spliced). Where a pattern matched but the rule declined, `misses` learns why."""
        reasons = []
        for root, _ in self.roots():
            if node.op != root.op:
                continue
            found = match_pattern(root, node, graph)
            if found is None:
                continue
            if self.condition is not None:
                verdict = _call(self.condition, found, found, context)
                if not verdict:
                    reasons.append(self._near_miss(verdict, found, f"{_function_name(self.condition)} is false"))
                    continue
            builder = GraphBuilder(graph, node.name or self.name)
            result = _call(self.replacement, builder, found, context)
            if not isinstance(result, (gs.Tensor, tuple)):
                reasons.append(self._near_miss(result, found, f"{_function_name(self.replacement)} declined"))
                continue
            output, shared = result if isinstance(result, tuple) else (result, {})
            kept = [name for name in found.shared if found.used_outside(name) and name not in shared]
            if kept:
                reasons.append(f"{', '.join(kept)} is read outside the match and has no replacement")
                continue
            if not dry:
                _splice(graph, found, builder, output, shared)
            return True
        reasons = [r for r in reasons if r]
        if misses is not None and reasons:
            misses.add(self.name, reasons[0], node.name or node.op)  # the first spelling that matched says why
        return False

    def _near_miss(self, verdict: Any, found: Match, default: str) -> str | None:
        """Why a matched rule declined, or None when that is not worth telling: a pattern of one or two nodes
        declined without a reason (remove-reshape on every Reshape that changes the shape) is no near miss."""
        if isinstance(verdict, Declined):
            return verdict.reason
        return default if len(found.nodes) >= NEAR_MISS_NODES else None


def _function_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", "")
    return f"{name.lstrip('_')}" if name and name != "<lambda>" else "the rule"


def _call(fn: Callable[..., Any], first: Any, found: Match, context: Any) -> Any:
    """Call a condition or replacement with the bindings it names, plus `match` and `context` if it asks."""
    parameters = list(inspect.signature(fn).parameters)[1:]
    kwargs = {k: v for k, v in found.bindings.items() if k in parameters}
    if "context" in parameters:
        kwargs["context"] = context
    if "match" in parameters:
        kwargs["match"] = found
    return fn(first, **kwargs)


def _splice(
    graph: gs.Graph, found: Match, builder: GraphBuilder, result: gs.Tensor, shared: dict[str, gs.Tensor]
) -> None:
    """Put the built nodes in place of the matched ones; the output and shared values keep their names."""
    replaced = [(found.output, result)]
    replaced += [(found.bindings[name], value) for name, value in shared.items() if found.used_outside(name)]
    for node in found.nodes:
        node.inputs.clear()
        node.outputs.clear()
    matched = {id(n) for n in found.nodes}
    position = next(i for i, n in enumerate(graph.nodes) if n is found.root)
    kept = [n for n in graph.nodes[:position] if id(n) not in matched]
    rest = [n for n in graph.nodes[position:] if id(n) not in matched]
    extra: list[gs.Node] = []
    for old, new in replaced:
        producer = next((n for n in builder.nodes if any(t is new for t in n.outputs)), None)
        if producer is not None:
            replace_uses(graph, new, old)  # built nodes that read the new value read it under the old name
            producer.outputs[next(i for i, t in enumerate(producer.outputs) if t is new)] = old
        elif old in graph.outputs:
            # The result is an existing value: a graph output must still be produced under its name.
            extra.append(gs.Node("Identity", builder._name(f"{builder.prefix}/Identity"), {}, [new], [old]))
        else:
            replace_uses(graph, old, new)
    graph.nodes = kept + builder.nodes + extra + rest


def _rules_by_root_op(rules: Sequence[RewriteRule]) -> dict[str, list[RewriteRule]]:
    by_op: dict[str, list[RewriteRule]] = {}
    for rule in rules:
        for root, _ in rule.roots():
            by_op.setdefault(root.op, [])
            if rule not in by_op[root.op]:
                by_op[root.op].append(rule)
    return by_op


def near_misses(graphs: Sequence[gs.Graph], rules: Sequence[RewriteRule], context: Any = None) -> NearMisses:
    """Where each rule's pattern matches but the rule declines, and why; the graphs are not changed."""
    misses = NearMisses()
    by_op = _rules_by_root_op(rules)
    for graph in graphs:
        for node in list(graph.nodes):
            for rule in by_op.get(node.op, ()):
                rule.try_rewrite(node, graph, context, misses, dry=True)
    return misses


def apply_rules(
    graphs: Sequence[gs.Graph], rules: Sequence[RewriteRule], context: Any = None, rounds: int = 8
) -> Counter:
    """Apply rules to each graph until none matches (at most `rounds` sweeps); count rewrites per rule."""
    counts: Counter = Counter()
    by_op = _rules_by_root_op(rules)
    for graph in graphs:
        for _ in range(rounds):
            changed = False
            for node in list(graph.nodes):
                if not node.outputs:  # removed by an earlier rewrite in this sweep
                    continue
                for rule in by_op.get(node.op, ()):
                    if rule.try_rewrite(node, graph, context):
                        counts[rule.name] += 1
                        changed = True
                        break
            if not changed:
                break
        graph.toposort()
    return counts


__all__ = [
    "ConstVar",
    "Declined",
    "Either",
    "GraphBuilder",
    "Literal",
    "Match",
    "NearMisses",
    "OpValue",
    "PatternBuilder",
    "RewriteRule",
    "Var",
    "apply_rules",
    "decline",
    "is_exactly",
    "match_pattern",
    "near_misses",
    "trace_pattern",
]
