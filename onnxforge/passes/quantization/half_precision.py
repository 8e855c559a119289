"""Convert float32 models to float16 (`fp16`) or bfloat16 (`bf16`), keeping numerically sensitive ops in float32.

Which nodes compute in half precision:
- ops in `KEEP_FLOAT32` (softmax, normalizations, accumulating reductions, Exp, Log, Pow, Sqrt, ...) and the
  nodes named in the `keep` option stay float32;
- `HALF_COMPUTE` ops (Conv, MatMul, Gemm, attention, recurrent layers) compute in half precision, casting
  float32 inputs: a half region starts at them;
- every other op follows its inputs, as in PyTorch's type promotion: half precision if some float input is
  half and none but scalars stays float32. So the Add of a float32 LayerNormalization output stays float32
  instead of costing two casts, and the shape and data-movement ops around a kept op get no casts;
- nodes computed from weights and shapes alone (Identity of a weight, Cast of a shape, Constant) are half
  precision only if all their consumers are, so a LayerNormalization scale behind an Identity stays exact;
  a lookup of a large weight at runtime indices (Gather on an embedding table) is half precision.
A node computes in half precision only if its operator schema (at the model's opset) admits the half type;
inputs whose schema admits only float32 (Resize scales) stay float32. Ops of other domains use
onnxruntime's schemas (com.microsoft Attention, FusedMatMul, ...), asked of the reference runtime
(`ctx.runtime.operator_schema`) whatever the backend; ops without any schema stay float32.
Nodes holding subgraphs (If, Loop, Scan) keep float32 inputs and outputs; their bodies are converted inside,
with casts at each body's borders, and outer values read by a body are cast once, in the outer graph.

A value crossing between the regions gets one Cast per direction, placed where the value is defined and
shared by all its consumers. Weights read by half-precision nodes are converted (finite values beyond the
half range are clamped to it, nonzero values too small for it become zero; both are counted); weights read
only by float32 nodes stay float32.

What onnxruntime does with the result on its CPU provider (1.32, x86-64): float16 kernels exist for a few
data-movement ops (Transpose, Concat, Clip, Max, Identity); for every other op its InsertCastTransformer casts
the float16 inputs back to float32, so an fp16 model loads, runs and matches float32 arithmetic on float16
weights. bfloat16 compute kernels do not exist there at all (Add, MatMul, Relu ... fail to load), so a bf16
model needs a GPU provider; on the CPU the pass manager's run check rolls the bf16 pass back.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
import onnx.defs
import onnx_graphsurgeon as gs

from onnxforge.ir import Model, infer_shapes
from onnxforge.ir.edit import make_constant, replace_uses, unique_name
from onnxforge.ir.ops import ONNX_DOMAINS
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass
from onnxforge.pipeline.tunables import SearchTarget, Tunable

KEEP_FLOAT32 = frozenset(
    {
        # Sums of exponentials and of squares overflow or lose the small terms in half precision.
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "CumSum",
        # Overflow (exp(x) > 65504 from x > 11) or blow up rounding errors near zero.
        "Exp",
        "Log",
        "Pow",
        "Sqrt",
        "Reciprocal",
        # Box coordinates in pixels: float16 steps by 2 above 2048.
        "NonMaxSuppression",
        "RoiAlign",
        # Their output type comes from an attribute, and their draws would differ anyway.
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
        "EyeLike",
        # Quantization scales must stay exact; quantization passes own these nodes.
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        # Training losses: a softmax and a reduction inside.
        "SoftmaxCrossEntropyLoss",
        "NegativeLogLikelihoodLoss",
    }
)

# Where half precision pays (matrix and convolution arithmetic): these compute in half precision even when
# their input is float32, so a half region starts at them.
HALF_COMPUTE = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "Einsum",
        "FusedMatMul",
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "RNN",
        "GRU",
        "LSTM",
    }
)


@dataclass(frozen=True)
class HalfType:
    """A half-precision float type: ONNX element type, largest finite value, and the tag used in new names."""

    onnx_type: int
    max_finite: float
    tag: str

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype (bfloat16 is ml_dtypes', as onnx maps it)."""
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.onnx_type))

    @property
    def schema_name(self) -> str:
        """How operator schemas write this type: 'tensor(float16)'."""
        return f"tensor({onnx.helper.tensor_dtype_to_string(self.onnx_type).removeprefix('TensorProto.').lower()})"


FLOAT16 = HalfType(onnx.TensorProto.FLOAT16, 65504.0, "fp16")
BFLOAT16 = HalfType(onnx.TensorProto.BFLOAT16, (2 - 2**-7) * 2.0**127, "bf16")
FLOAT32 = np.dtype(np.float32)
# Weights up to this size (scalars, shape-like vectors) read together with runtime values may stay float32.
SMALL_WEIGHT_BYTES = 1024


@dataclass
class HalfPrecisionOptions:
    """Options of the fp16 and bf16 passes."""

    # Op types or node names that stay float32, on top of KEEP_FLOAT32 (`fp16:keep=Softmax+MatMul`).
    keep: list[str] = field(default_factory=list)
    # Op types of KEEP_FLOAT32 to convert anyway, e.g. Softmax for a GPU whose half Softmax sums in float32.
    convert: list[str] = field(default_factory=list)
    # Keep the graph's float32 inputs and outputs float32 (casts at the border), so callers feed the same arrays.
    keep_io_types: bool = True


class HalfPrecisionPass(Pass):
    """Base of the fp16 and bf16 passes: subclasses name the half type."""

    lossless = False
    Options = HalfPrecisionOptions
    half: ClassVar[HalfType]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return HalfPrecisionConversion(model, self.half, self.options, ctx.runtime.operator_schema).run()

    @classmethod
    def search_space(cls, model: Model, where: SearchTarget) -> dict[str, Tunable] | None:
        """Offered at its defaults on a CUDA target (`cuda`, `cuda:sm_NN`); None on CPU targets, whose kernels
        compute half precision in float32 after casts (onnxruntime) or not at all (bfloat16): slower there."""
        return {} if where.target.partition(":")[0] == "cuda" else None


@register_pass("fp16")
class Float16Conversion(HalfPrecisionPass):
    """Convert float32 weights and compute to float16; Softmax, norms, reductions, Exp/Log/Pow stay float32."""

    half = FLOAT16


@register_pass("bf16")
class BFloat16Conversion(HalfPrecisionPass):
    """Convert float32 weights and compute to bfloat16; Softmax, norms, reductions, Exp/Log/Pow stay float32."""

    half = BFLOAT16


@dataclass
class NodePlan:
    """What becomes of one node: half precision with the slots that convert, or float32 and why."""

    node: gs.Node
    half: bool
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    float32_reason: str = ""  # empty for nodes that touch no float32 tensor
    # Computed from weights and shapes only (Identity of a weight, Cast of a shape): its consumers decide.
    by_consumers: bool = False


@dataclass
class WeightCounts:
    """Weights converted, their bytes before and after, and the values clamped or flushed to zero."""

    converted: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    clamped: int = 0
    flushed: int = 0

    def convert(self, values: np.ndarray, half: HalfType) -> np.ndarray:
        """Return `values` in the half type, clamping finite values to its range; count what that did."""
        values = np.asarray(values, dtype=FLOAT32)
        too_large = np.isfinite(values) & (np.abs(values) > half.max_finite)
        converted = np.where(too_large, np.sign(values) * half.max_finite, values).astype(half.dtype)
        self.converted += 1
        self.bytes_before += values.nbytes
        self.bytes_after += converted.nbytes
        self.clamped += int(np.count_nonzero(too_large))
        self.flushed += int(np.count_nonzero((values != 0) & (converted == 0)))
        return converted


class HalfPrecisionConversion:
    """One conversion of a model to a half type: plan every node, then convert weights and insert casts.

    `other_schema(op, domain, opset)` gives the schemas onnx does not have (`PassContext.operator_schema`).
    """

    def __init__(self, model: Model, half: HalfType, options: HalfPrecisionOptions, other_schema: Callable):
        self.model = model
        self.half = half
        self.other_schema = other_schema
        self.keep_io_types = options.keep_io_types
        self.keep = (KEEP_FLOAT32 - set(options.convert)) | set(options.keep)
        self.float32: set[int] = set()  # ids of the tensors that were float32 before the conversion
        self.half_values: set[int] = set()  # ids of the float32 variables that become half
        self.by_consumers: set[int] = set()  # ids of the outputs of nodes whose consumers decide their precision
        self.defined_in: dict[int, gs.Graph] = {}
        self.casts: dict[tuple[int, bool], gs.Variable] = {}
        self.weights = WeightCounts()

    def run(self) -> PassResult:
        infer_shapes(self.model)  # the plan needs every value's dtype
        self.model.graph.toposort()
        graphs = list(self.model.graphs())
        for graph in graphs:
            self._index(graph)
        if not self.float32:
            return PassResult(False, {"float32_tensors": 0}, notes=["no float32 weights or values to convert"])
        half_inputs = [] if self.keep_io_types else [t for t in self.model.graph.inputs if id(t) in self.float32]
        self.half_values.update(id(t) for t in half_inputs)
        plans = [self._plan(node) for graph in graphs for node in graph.nodes]
        self._decide_by_consumers(plans)
        for graph in graphs:
            self._cast_outputs(graph)
        weights_left = self._convert_constants(plans)
        for plan in plans:
            self._rewire_inputs(plan)
            if plan.half:
                self._convert_attributes(plan)
        self._set_dtypes(graphs)
        if self.casts:
            self.model.graph.toposort()
        converted = sum(plan.half for plan in plans)
        kept = [plan for plan in plans if plan.float32_reason]
        stats = {
            "nodes_converted": converted,
            "nodes_kept_float32": len(kept),
            "casts_inserted": len(self.casts),
            "weights_converted": self.weights.converted,
            "weight_bytes_before": self.weights.bytes_before,
            "weight_bytes_after": self.weights.bytes_after,
            "weights_left_float32": weights_left,
            "values_clamped": self.weights.clamped,
            "values_flushed_to_zero": self.weights.flushed,
        }
        changed = bool(converted or self.casts or self.weights.converted or half_inputs)
        return PassResult(changed, stats, notes=_kept_notes(kept))

    def _index(self, graph: gs.Graph) -> None:
        """Record where each value of `graph` is defined and which tensors are float32."""
        for tensor in graph.inputs:
            self.defined_in[id(tensor)] = graph
        for node in graph.nodes:
            for tensor in node.outputs:
                self.defined_in[id(tensor)] = graph
        for tensor in graph.tensors().values():
            if _is_float32(tensor) and tensor.name not in self.model.value_types:
                self.float32.add(id(tensor))

    def _plan(self, node: gs.Node) -> NodePlan:
        """Decide the node's precision from its op, schema and inputs; mark its half outputs."""
        touches_float32 = any(id(t) in self.float32 for t in [*node.inputs, *node.outputs])
        if not touches_float32:
            return NodePlan(node, half=False)
        reason = self._float32_reason(node)
        if reason:
            return NodePlan(node, half=False, float32_reason=reason)
        signature = _onnx_signature(node.op, _domain(node), self._opset(node))
        if signature is None:
            schema = self.other_schema(node.op, _domain(node), self._opset(node))
            signature = None if schema is None else Signature.of(schema.inputs, schema.outputs, schema.allowed)
        if signature is None:
            return NodePlan(node, half=False, float32_reason="no operator schema")
        inputs = signature.half_slots(node.inputs, signature.inputs, signature.variadic_inputs, self.float32, self.half)
        outputs = signature.half_slots(
            node.outputs, signature.outputs, signature.variadic_outputs, self.float32, self.half
        )
        if inputs is None or outputs is None or not (inputs or outputs):
            return NodePlan(node, half=False, float32_reason=f"its schema has no {self.half.dtype.name} type")
        plan = NodePlan(node, half=True, inputs=tuple(inputs), outputs=tuple(outputs))
        if node.op not in HALF_COMPUTE:
            sources = [node.inputs[i] for i in inputs if isinstance(node.inputs[i], gs.Variable)]
            if all(id(t) in self.by_consumers for t in sources) and not _looks_up_weight(node, inputs):
                plan.half, plan.by_consumers = False, True
                self.by_consumers.update(id(node.outputs[i]) for i in outputs)
                return plan
            if any(self._keeps_float32(t) for t in sources) or (
                sources and not any(id(t) in self.half_values for t in sources)
            ):
                return NodePlan(node, half=False, float32_reason="follows a float32 input")
        self.half_values.update(id(node.outputs[i]) for i in outputs)
        return plan

    def _keeps_float32(self, source: gs.Variable) -> bool:
        """True if a node reading `source` and half-precision tensors computes in float32 (unless HALF_COMPUTE).

        Scalars do not count, as in PyTorch's type promotion: a float32 scale computed from shapes (the
        1/sqrt(head size) of attention) is cast instead of pulling a whole tensor back to float32.
        """
        if id(source) in self.half_values or id(source) in self.by_consumers:
            return False
        shape = source.shape
        scalar = shape is not None and all(isinstance(d, int) for d in shape) and math.prod(shape) <= 1
        return not scalar

    def _decide_by_consumers(self, plans: list[NodePlan]) -> None:
        """Nodes computed from weights and shapes only compute in half precision if all their consumers do.

        Decided from the last node back, so that a chain of such nodes follows the consumers at its end.
        """
        plan_of = {id(plan.node): plan for plan in plans}
        for plan in reversed(plans):
            if not plan.by_consumers:
                continue
            wants = []
            for output in (plan.node.outputs[i] for i in plan.outputs):
                graph = self.defined_in[id(output)]
                if any(output is t for t in graph.outputs):
                    wants.append(graph is self.model.graph and not self.keep_io_types)
                for consumer in output.outputs:
                    reader = plan_of[id(consumer)]
                    wants.extend(
                        reader.half and index in reader.inputs
                        for index, tensor in enumerate(consumer.inputs)
                        if tensor is output
                    )
            plan.half = bool(wants) and all(wants)
            if plan.half:
                self.half_values.update(id(plan.node.outputs[i]) for i in plan.outputs)
            else:
                plan.float32_reason = "computed from weights or shapes for float32 consumers"

    def _float32_reason(self, node: gs.Node) -> str:
        """Why the node must stay float32 whatever its inputs, or '' if it may be converted."""
        if node.op in self.keep or node.name in self.keep:
            return "keep set"
        if any(_holds_graph(attr) for attr in node.attrs.values()):
            return "holds a subgraph (converted inside)"
        for tensor in [*node.inputs, *node.outputs]:
            if tensor.is_empty():
                continue
            if tensor.dtype is None or tensor.name in self.model.value_types:
                return "unknown input or output type"
            if isinstance(tensor, gs.Variable) and tensor.type != "tensor_type":
                return "sequence input or output"
        if node.op == "Constant" and not isinstance(node.attrs.get("value"), gs.Constant):
            return "value given as a float attribute"
        return ""

    def _opset(self, node: gs.Node) -> int:
        domain = _domain(node)
        if domain == "":
            return self.model.graph.opset
        versions = {o.domain: o.version for o in self.model.header.opset_import}
        return versions.get(domain, 1)

    def _cast_outputs(self, graph: gs.Graph) -> None:
        """Give each float32 output of `graph` the type callers expect: a Cast writes it under its own name."""
        as_half = graph is self.model.graph and not self.keep_io_types
        for index, output in enumerate(graph.outputs):
            if id(output) not in self.float32 or isinstance(output, gs.Constant):
                continue
            if (id(output) in self.half_values) == as_half:
                continue
            producer = output.inputs[0] if output.inputs else None
            if producer is None or self.defined_in.get(id(output)) is not graph:
                # A body output read from the outer graph: bodies' outputs are positional, a new name is fine.
                graph.outputs[index] = self._cast(output, as_half)
                continue
            # Keep the output's name: its producer writes a new value, cast into the output.
            computed = gs.Variable(unique_name(graph, f"{output.name}_computed"), output.dtype, output.shape)
            producer.outputs[producer.outputs.index(output)] = computed
            replace_uses(graph, output, computed)
            self._register(computed, graph, half=not as_half)
            self.casts[(id(computed), as_half)] = output
            graph.nodes.append(self._cast_node(graph, computed, output, as_half))
            if as_half:
                self.half_values.add(id(output))
            else:
                self.half_values.discard(id(output))

    def _convert_constants(self, plans: list[NodePlan]) -> int:
        """Convert the weights half nodes read; a weight also read in float32 keeps its float32 copy.

        Returns how many weights are still read as float32.
        """
        uses: dict[int, list[tuple[gs.Node, int, bool]]] = {}
        for plan in plans:
            for index, tensor in enumerate(plan.node.inputs):
                if isinstance(tensor, gs.Constant) and id(tensor) in self.float32:
                    uses.setdefault(id(tensor), []).append((plan.node, index, plan.half and index in plan.inputs))
        left_float32 = 0
        for constant_uses in uses.values():
            node, index, _ = constant_uses[0]
            constant = node.inputs[index]
            wanted = {as_half for _, _, as_half in constant_uses}
            left_float32 += False in wanted
            if True not in wanted:
                continue
            values = self.weights.convert(constant.values, self.half)
            if wanted == {True}:
                converted = gs.Constant(constant.name, values)  # the float32 one goes away with its last use
            else:
                converted = make_constant(self.model.graph, f"{constant.name}_{self.half.tag}", values)
            for consumer, slot, as_half in constant_uses:
                if as_half:
                    consumer.inputs[slot] = converted
        return left_float32

    def _rewire_inputs(self, plan: NodePlan) -> None:
        """Make each float32 variable input of the node read the precision the node computes in."""
        for index, tensor in enumerate(plan.node.inputs):
            if not isinstance(tensor, gs.Variable) or id(tensor) not in self.float32:
                continue
            as_half = plan.half and index in plan.inputs
            if (id(tensor) in self.half_values) != as_half:
                plan.node.inputs[index] = self._cast(tensor, as_half)

    def _convert_attributes(self, plan: NodePlan) -> None:
        """Attributes that say an output is float32 (Cast `to`, Constant and ConstantOfShape `value`)."""
        node = plan.node
        if not plan.outputs:
            return
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = self.half.onnx_type
        elif node.op in ("Constant", "ConstantOfShape"):
            value = node.attrs.get("value")
            values = np.zeros(1, FLOAT32) if value is None else value.values
            name = value.name if value is not None and value.name else f"{node.name}_value"
            node.attrs["value"] = gs.Constant(name, self.weights.convert(values, self.half))

    def _cast(self, value: gs.Variable, as_half: bool) -> gs.Variable:
        """`value` in the other precision: one Cast per value and direction, in the graph defining `value`."""
        key = (id(value), as_half)
        if key not in self.casts:
            graph = self.defined_in[id(value)]
            tag = self.half.tag if as_half else "fp32"
            dtype = self.half.dtype if as_half else FLOAT32
            cast = gs.Variable(unique_name(graph, f"{value.name}_{tag}"), dtype, value.shape)
            graph.nodes.append(self._cast_node(graph, value, cast, as_half))
            self._register(cast, graph, as_half)
            self.casts[key] = cast
        return self.casts[key]

    def _cast_node(self, graph: gs.Graph, source: gs.Variable, result: gs.Variable, as_half: bool) -> gs.Node:
        to = self.half.onnx_type if as_half else onnx.TensorProto.FLOAT
        name = unique_name(graph, f"{source.name}_to_{self.half.tag if as_half else 'fp32'}")
        return gs.Node("Cast", name=name, attrs={"to": to}, inputs=[source], outputs=[result])

    def _register(self, value: gs.Variable, graph: gs.Graph, half: bool) -> None:
        self.defined_in[id(value)] = graph
        self.float32.add(id(value))
        if half:
            self.half_values.add(id(value))

    def _set_dtypes(self, graphs: list[gs.Graph]) -> None:
        for graph in graphs:
            for tensor in [*graph.inputs, *graph.outputs, *(t for n in graph.nodes for t in n.outputs)]:
                if isinstance(tensor, gs.Variable) and id(tensor) in self.half_values:
                    tensor.dtype = self.half.dtype


@dataclass(frozen=True)
class Signature:
    """An operator's formal inputs and outputs (type strings) and the types each type variable allows."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variadic_inputs: bool
    variadic_outputs: bool
    allowed: Mapping[str, frozenset[str]]

    @classmethod
    def of(
        cls, inputs: tuple[tuple[str, str], ...], outputs: tuple[tuple[str, str], ...],
        allowed: Mapping[str, frozenset[str]],
    ) -> Signature:
        """The signature of a schema's formal inputs and outputs, each (type string, option), and type variables."""
        return cls(
            inputs=tuple(t for t, _ in inputs),
            outputs=tuple(t for t, _ in outputs),
            variadic_inputs=bool(inputs) and inputs[-1][1] == "Variadic",
            variadic_outputs=bool(outputs) and outputs[-1][1] == "Variadic",
            allowed=allowed,
        )

    def half_slots(
        self, tensors: list[gs.Tensor], formal: tuple[str, ...], variadic: bool, float32: set[int], half: HalfType
    ) -> list[int] | None:
        """Positions of the `tensors` whose ids are in `float32` and whose formal type admits `half`.

        `formal` and `variadic` are this signature's inputs or outputs; None if there are more tensors than
        the schema has parameters.
        """
        slots = []
        for index, tensor in enumerate(tensors):
            if id(tensor) not in float32:
                continue
            if index >= len(formal) and not variadic:
                return None
            type_str = formal[min(index, len(formal) - 1)]
            if half.schema_name in self.allowed.get(type_str, {type_str}):
                slots.append(index)
        return slots


@functools.cache
def _onnx_signature(op: str, domain: str, opset: int) -> Signature | None:
    """The signature of `op` in `domain` at `opset` from onnx's schemas; None if onnx does not define it."""
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return None
    return Signature.of(
        tuple((p.type_str, p.option.name) for p in schema.inputs),
        tuple((p.type_str, p.option.name) for p in schema.outputs),
        {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints},
    )


def _looks_up_weight(node: gs.Node, inputs: list[int]) -> bool:
    """True if the node reads a large float weight at runtime indices (Gather on an embedding table, Slice).

    Such a node computes in half precision whatever its consumers, so that the table is stored in half.
    """
    indexed = any(isinstance(t, gs.Variable) for t in node.inputs)
    return indexed and any(
        isinstance(node.inputs[i], gs.Constant) and node.inputs[i].values.nbytes > SMALL_WEIGHT_BYTES for i in inputs
    )


def _domain(node: gs.Node) -> str:
    return "" if node.domain in ONNX_DOMAINS else node.domain


def _is_float32(tensor: gs.Tensor) -> bool:
    dtype = tensor.dtype
    return dtype is not None and not isinstance(dtype, int) and np.dtype(dtype) == FLOAT32


def _holds_graph(attr: object) -> bool:
    return isinstance(attr, gs.Graph) or (isinstance(attr, list) and any(isinstance(a, gs.Graph) for a in attr))


def _kept_notes(kept: list[NodePlan]) -> list[str]:
    """One line per reason, naming the op types kept in float32 for it: 'kept float32 (keep set): Softmax x2'."""
    by_reason: dict[str, Counter] = {}
    for plan in kept:
        by_reason.setdefault(plan.float32_reason, Counter())[plan.node.op] += 1
    return [
        f"kept float32 ({reason}): " + ", ".join(f"{op} x{count}" for op, count in ops.most_common())
        for reason, ops in by_reason.items()
    ]
