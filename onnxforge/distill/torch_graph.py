"""An onnxforge model as a trainable torch module (`TorchGraph`), and its learned weights written back into the
same graph (`write_back`).

The module evaluates the graph's nodes in topological order with the torch implementations of
onnxforge.distill's op tables. A float initializer (float32, float16 or bfloat16) of more than one finite value
that feeds arithmetic (a weight, bias, normalization scale or shift, a DequantizeLinear's per-channel scale,
MatMulNBits' scales) becomes a parameter, trained in float32 and cast to its stored dtype where the graph reads it.
Integer weight codes train too (onnxforge.distill.learned_codes): a DequantizeLinear's int8, uint8, int16,
uint16, int4 or uint4 codes (with a constant scale) and MatMulNBits' packed 4- or 8-bit codes, where nothing else
reads them, become a float32 parameter of one value a code, read rounded (the gradient passing straight through)
and clamped to the code range, and written back rounded, clipped and packed as stored. Every other constant
(shapes, axes, indices, scalars, other integer tensors, zero points, masks, the values of Constant nodes and what
configures an op: sizes, pad values) is a buffer that is not trained.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx_graphsurgeon.ir.tensor import LazyValues
from torch import nn

from onnxforge.distill import contrib_ops, onnx_ops, quantized_ops
from onnxforge.distill.learned_codes import CodeLayout, trained_code_layouts
from onnxforge.distill.op_table import ONNX_DOMAINS, OpCall, OpTable, TorchConversionError
from onnxforge.errors import DataError
from onnxforge.ir import Model

TORCH_OPS = onnx_ops.OPS.merged(contrib_ops.OPS, quantized_ops.OPS)
TRAINABLE_DTYPES = ("float32", "float16", "bfloat16")
# Element types numpy holds through ml_dtypes that torch computes in a wider type: 4-bit codes as 8-bit
# integers, 8-bit floats (FP8 codes of a DequantizeLinear) as float32.
_WIDENED = {"int4": np.int8, "uint4": np.uint8, "int2": np.int8, "uint2": np.uint8}
# Quantized ops that compute on integers: nothing to pass a gradient through, so they have no implementation.
INTEGER_KERNELS = frozenset(
    {"ConvInteger", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearAdd", "QLinearConv",
     "QLinearMatMul", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool",
     "QLinearConcat", "QLinearAveragePool", "QLinearSoftmax"}
)
# Attribute names a module or parameter dict has already: no parameter or buffer may take them.
_RESERVED_KEYS = frozenset(dir(nn.ParameterDict()))


@dataclass(frozen=True)
class _Step:
    """One node to evaluate: its implementation and call, the values it reads ("" for an absent input) and
    writes, and the values no later step reads (released after it)."""

    run: Callable[..., Any]
    call: OpCall
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...]


class TorchGraph(nn.Module):
    """The main graph of an onnxforge model as a torch module whose parameters are the graph's learnable weights.

    `forward(feeds)` takes the graph inputs by name (tensors or numpy arrays) and returns the graph outputs by
    name. TorchConversionError (an OnnxforgeError) when the graph holds subgraphs (If, Loop, Scan) or ops, or
    attribute values, without a torch implementation: one error naming all of them.
    """

    def __init__(self, model: Model, ops: OpTable = TORCH_OPS):
        super().__init__()
        graph = model.graph
        _refuse_subgraphs(graph)
        opsets = {o.domain: o.version for o in model.header.opset_import}
        for domain in ONNX_DOMAINS:
            opsets[domain] = graph.opset
        nodes = _topological_order(graph)
        constant_nodes = [node for node in nodes if node.op == "Constant"]  # their values become buffers
        evaluated = [node for node in nodes if node.op != "Constant"]
        calls = [_call_of(node, opsets) for node in evaluated]
        _refuse_unimplemented(constant_nodes, evaluated, calls, ops)

        arrays = {t.name: _peek(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        learnable = _learnable_constants(graph, arrays, ops)
        self._codes = trained_code_layouts(graph, arrays)  # initializer name -> how it stores its codes
        self.weights = nn.ParameterDict()
        self.fixed = nn.Module()  # holds the buffers
        self._parameter_keys: dict[str, str] = {}  # initializer name -> key in self.weights
        self._buffer_keys: dict[str, str] = {}  # value name -> buffer name in self.fixed
        self._dtypes: dict[str, torch.dtype] = {}  # initializer name -> the dtype the graph reads
        keys = set(_RESERVED_KEYS)
        for name, array in arrays.items():
            if name in self._codes:
                key = _unique_key(name, keys)
                self.weights[key] = nn.Parameter(torch.from_numpy(self._codes[name].unpacked(array)))
                self._parameter_keys[name] = key
                continue
            value = _tensor_of(array, name)
            if name in learnable:
                key = _unique_key(name, keys)
                self.weights[key] = nn.Parameter(value.float())
                self._parameter_keys[name], self._dtypes[name] = key, value.dtype
            else:
                self._add_buffer(name, value, keys)
        for node in constant_nodes:
            self._add_buffer(node.outputs[0].name, _tensor_of(_constant_node_value(node), node.name), keys)

        self._input_names = [t.name for t in graph.inputs if not isinstance(t, gs.Constant)]
        self._output_names = [t.name for t in graph.outputs]
        self._steps = _steps(evaluated, calls, ops, set(self._output_names))

    def _add_buffer(self, name: str, value: torch.Tensor, keys: set[str]) -> None:
        key = _unique_key(name, keys)
        self.fixed.register_buffer(key, value)
        self._buffer_keys[name] = key

    def forward(
        self, feeds: Mapping[str, torch.Tensor | np.ndarray], also: Collection[str] = ()
    ) -> dict[str, torch.Tensor]:
        """The graph outputs by name, and the intermediate tensors named in `also`."""
        values = self._feed_values(feeds)
        for name, key in self._buffer_keys.items():
            values[name] = getattr(self.fixed, key)
        for name, key in self._parameter_keys.items():
            parameter = self.weights[key]
            if name in self._codes:
                values[name] = self._codes[name].rounded(parameter)
            else:
                dtype = self._dtypes[name]
                values[name] = parameter if parameter.dtype == dtype else parameter.to(dtype)
        for step in self._steps:
            results = step.run(step.call, *(values[name] if name else None for name in step.inputs))
            if isinstance(results, torch.Tensor):
                results = (results,)
            for name, result in zip(step.outputs, results):
                if name:
                    values[name] = result
            for name in step.release:
                if name not in also:
                    values.pop(name, None)
        return {name: values[name] for name in [*self._output_names, *also]}

    def _feed_values(self, feeds: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        missing = [name for name in self._input_names if name not in feeds]
        unknown = [name for name in feeds if name not in self._input_names]
        if missing or unknown:
            raise DataError(f"the feeds {sorted(feeds)} do not fit the graph inputs {self._input_names}")
        device = self._device()
        return {
            name: (value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))).to(device)
            for name, value in feeds.items()
        }

    def _device(self) -> torch.device:
        for tensor in (*self.weights.values(), *self.fixed.buffers()):
            return tensor.device
        return torch.device("cpu")

    def initializer_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters by the name of the initializer each one is."""
        return {name: self.weights[key] for name, key in self._parameter_keys.items()}

    def code_layouts(self) -> dict[str, CodeLayout]:
        """How each initializer whose parameter holds integer codes stores them, by the initializer's name."""
        return dict(self._codes)

    def parameter_names(self) -> dict[str, str]:
        """The initializer name of each parameter, keyed by its name in `named_parameters()`."""
        return {f"weights.{key}": name for name, key in self._parameter_keys.items()}

    def freeze(self, names: Iterable[str]) -> None:
        """Stop training the parameters of these initializers (ValueError for a name that is not one)."""
        for parameter in self._parameters_named(names):
            parameter.requires_grad_(False)

    def train_only(self, names: Iterable[str]) -> None:
        """Train the parameters of these initializers and freeze every other one."""
        chosen = {id(p) for p in self._parameters_named(names)}
        for parameter in self.weights.values():
            parameter.requires_grad_(id(parameter) in chosen)

    def _parameters_named(self, names: Iterable[str]) -> list[nn.Parameter]:
        names = list(names)
        unknown = [name for name in names if name not in self._parameter_keys]
        if unknown:
            raise ValueError(f"not initializers the module trains: {unknown}")
        return [self.weights[self._parameter_keys[name]] for name in names]


def write_back(model: Model, module: TorchGraph) -> Model:
    """A copy of `model` whose learnable initializers hold `module`'s parameter values, each cast back to its
    stored dtype and shape (integer codes rounded, clipped to their range and packed as stored). Nodes, names,
    attributes, opsets, graph inputs and outputs and every other initializer stay as they are; `model` itself is
    not changed (its weight arrays are never written into).

    ValueError when the module was not built from this graph (an initializer missing or of another shape).
    """
    copy = model.copy()
    constants = {t.name: t for t in copy.graph.tensors().values() if isinstance(t, gs.Constant)}
    layouts = module.code_layouts()
    for name, parameter in module.initializer_parameters().items():
        tensor, layout = constants.get(name), layouts.get(name)
        stored_shape = tuple(parameter.shape) if layout is None else layout.shape
        if tensor is None or tuple(tensor.shape) != stored_shape:
            raise ValueError(f"the module's parameter {name!r} is not an initializer of this shape in the model")
        trained = parameter.detach().to("cpu", torch.float32).numpy()
        tensor.values = trained.astype(_peek(tensor).dtype) if layout is None else layout.stored(trained)
    return copy


# --- building the steps --------------------------------------------------------------------------------------


def _refuse_subgraphs(graph: gs.Graph) -> None:
    holders = sorted(
        {
            f"{node.op} {node.name!r}"
            for node in graph.nodes
            for value in node.attrs.values()
            if isinstance(value, gs.Graph) or (isinstance(value, list) and any(isinstance(v, gs.Graph) for v in value))
        }
    )
    if holders:
        raise TorchConversionError(
            f"the graph holds subgraphs, which the torch evaluation does not run: {', '.join(holders)}"
        )


def _topological_order(graph: gs.Graph) -> list[gs.Node]:
    """The nodes so that each comes after those producing its inputs, otherwise in graph order."""
    nodes = list(graph.nodes)
    producer = {t.name: i for i, node in enumerate(nodes) for t in node.outputs if t.name}
    waiting_on = [{producer[t.name] for t in node.inputs if t.name in producer} for node in nodes]
    consumers: dict[int, list[int]] = {}
    for i, needed in enumerate(waiting_on):
        for j in needed:
            consumers.setdefault(j, []).append(i)
    ready = [i for i, needed in enumerate(waiting_on) if not needed]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in consumers.get(i, ()):
            waiting_on[j].discard(i)
            if not waiting_on[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise TorchConversionError("the graph has a cycle: its nodes have no order to evaluate them in")
    return order


def _element_type(tensor: gs.Tensor) -> int | None:
    dtype = tensor.dtype
    if dtype is None or isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


def _call_of(node: gs.Node, opsets: dict[str, int]) -> OpCall:
    domain = node.domain or ""
    attrs = {k: (_peek(v) if isinstance(v, gs.Constant) else v) for k, v in node.attrs.items()}
    return OpCall(
        name=node.name,
        op=node.op,
        attrs=attrs,
        opset=opsets.get(domain, 1),
        given_inputs=tuple(bool(t.name) for t in node.inputs),
        used_outputs=tuple(bool(t.name) for t in node.outputs),
        input_types=tuple(_element_type(t) if t.name else None for t in node.inputs),
    )


def _refuse_unimplemented(
    constant_nodes: list[gs.Node], nodes: list[gs.Node], calls: list[OpCall], ops: OpTable
) -> None:
    """One TorchConversionError naming every op type without an implementation and every node whose attributes
    an implementation refuses."""
    missing: set[str] = set()
    refused = [
        f"Constant {node.name!r}: only numeric values are implemented"
        for node in constant_nodes
        if not {"value", "value_float", "value_floats", "value_int", "value_ints"} & set(node.attrs)
    ]
    for node, call in zip(nodes, calls):
        op = ops.get(node.domain or "", node.op)
        if op is None:
            missing.add(f"{node.domain}.{node.op}" if node.domain and node.domain not in ONNX_DOMAINS else node.op)
        elif op.refuse is not None and (reason := op.refuse(call)):
            refused.append(f"{node.name!r}: {reason}")
    if missing or refused:
        parts = [f"ops without a torch implementation: {', '.join(sorted(missing))}"] if missing else []
        if any(name.rsplit(".", 1)[-1] in INTEGER_KERNELS for name in missing):
            parts.append("integer kernels have no gradient: quantize in QDQ form (quant:format=qdq) to train")
        raise TorchConversionError("; ".join(parts + refused))


def _learnable_constants(graph: gs.Graph, arrays: dict[str, np.ndarray], ops: OpTable) -> set[str]:
    """Float initializers (values by name) of more than one finite value that no node reads as a fixed input."""
    fixed, read = set(), set()
    for node in graph.nodes:
        op = ops.get(node.domain or "", node.op)
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                (fixed if op is None or index in op.fixed_inputs else read).add(tensor.name)
    learnable = set()
    for name in read - fixed:
        values = arrays[name]
        if values.dtype.name in TRAINABLE_DTYPES and values.size > 1 and np.isfinite(values.astype(np.float32)).all():
            learnable.add(name)
    return learnable


def _steps(nodes: list[gs.Node], calls: list[OpCall], ops: OpTable, kept: set[str]) -> list[_Step]:
    """The steps of `nodes`, each releasing the values that no later step reads (graph outputs are `kept`)."""
    last_read: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for tensor in node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant):
                last_read[tensor.name] = index
    steps = []
    for index, (node, call) in enumerate(zip(nodes, calls)):
        outputs = tuple(t.name for t in node.outputs)
        done = {name for name, last in last_read.items() if last == index}
        unread = {name for name in outputs if name and name not in last_read}
        steps.append(
            _Step(
                run=ops.get(node.domain or "", node.op).run,
                call=call,
                inputs=tuple(t.name for t in node.inputs),
                outputs=outputs,
                release=tuple(sorted((done | unread) - kept)),
            )
        )
    return steps


# --- constants -----------------------------------------------------------------------------------------------


def _peek(constant: gs.Constant) -> np.ndarray:
    """The values of a constant, read without keeping them: graphsurgeon exports a weight it has loaded
    (`.values`) from the loaded array, which breaks 4-bit codes."""
    values = constant._values
    return np.asarray(values.load() if isinstance(values, LazyValues) else values)


def _constant_node_value(node: gs.Node) -> np.ndarray:
    attrs = node.attrs
    if "value" in attrs:
        return _peek(attrs["value"])
    if "value_float" in attrs or "value_floats" in attrs:
        return np.array(attrs.get("value_float", attrs.get("value_floats")), np.float32)
    return np.array(attrs.get("value_int", attrs.get("value_ints")), np.int64)


def _tensor_of(values: np.ndarray, name: str) -> torch.Tensor:
    """A torch copy of a constant: bfloat16 kept, 4-bit codes widened to 8 bits, 8-bit floats to float32."""
    dtype_name = values.dtype.name
    if dtype_name == "bfloat16":
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    if dtype_name in _WIDENED:
        return torch.from_numpy(values.astype(_WIDENED[dtype_name]))
    if dtype_name.startswith(("float8", "float4")):
        return torch.from_numpy(values.astype(np.float32))
    if values.dtype.kind in "OSUV":
        raise TorchConversionError(f"the constant {name!r} holds {values.dtype} values, which torch cannot hold")
    return torch.from_numpy(np.array(values))


def _unique_key(name: str, taken: set[str]) -> str:
    """A module attribute name for a value name (no dots), not taken yet."""
    key = re.sub(r"\W", "_", name) or "value"
    candidate, number = key, 1
    while candidate in taken:
        number += 1
        candidate = f"{key}_{number}"
    taken.add(candidate)
    return candidate
