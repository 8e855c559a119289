"""Static int8 over regions: connected ops that onnxruntime runs in int8 end to end once every tensor between them is
quantized, so that no float island breaks the int8 path between two Conv layers.

A Conv quantized alone pays a QuantizeLinear before it and a DequantizeLinear after it, which on a CPU without fast
int8 can cost more than the integer kernel saves. Quantized with its neighbours (Add, Concat, Mul, Sigmoid, pooling,
Resize, reshaping), onnxruntime fuses each QDQ group into an int8 kernel (QLinearConv, QLinearAdd, QLinearConcat,
QLinearMul, QLinearSigmoid, QLinearLeakyRelu, QLinearAveragePool, QLinearGlobalAveragePool) or drops the pair around
an op that only moves values, and the activations stay int8 from one Conv to the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model, infer_shapes
from onnxforge.ir.layers import Layer
from onnxforge.passes.quantization.candidates import WeightQuantizer, model_nodes
from onnxforge.passes.quantization.rewrite import ActivationQuantization, LayerFormat, LayerRewriter, quantized_output

# The ops a region holds, with the positions of their inputs that carry data (None: every input). Scales, shapes,
# indices and Clip's bounds stay as they are.
REGION_OPS: dict[str, tuple[int, ...] | None] = {
    "Conv": (0,),
    "Add": (0, 1),
    "Mul": (0, 1),
    "Concat": None,
    "Sigmoid": (0,),
    "LeakyRelu": (0,),
    "Relu": (0,),
    "Clip": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    **{op: (0,) for op in ("MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice")},
}
# Ops that only move or select values: onnxruntime drops the QDQ pair around one when both sides share a scale and
# zero point, so their outputs take their input's.
MOVING_OPS = ("MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice")
# Ops whose constant inputs are quantized too: their int8 kernels read every input as int8.
CONSTANT_OPERAND_OPS = ("Add", "Mul", "Concat")


@dataclass(frozen=True)
class Region:
    """Connected ops of the main graph (positions in its node list) with at least one Conv layer among them."""

    nodes: tuple[int, ...]
    convs: tuple[int, ...]
    first: str  # the name of its first node, to tell regions apart in notes

    def describe(self) -> str:
        return f"{len(self.nodes)} ops, {len(self.convs)} Conv, from {self.first}"


def find_regions(model: Model, layers: Mapping[int, Layer]) -> list[Region]:
    """The regions of `model`'s main graph, in graph order: connected components of the REGION_OPS nodes that read
    float data, joined by the float tensors between them, that hold a Conv layer (`layers`: by position in
    model_nodes, whose main graph nodes come first). A Conv without a constant weight joins no region."""
    graph = model.graph
    infer_shapes(model)
    position = {id(node): index for index, node in enumerate(graph.nodes)}
    members = {
        index
        for index, node in enumerate(graph.nodes)
        if node.op in REGION_OPS
        and (node.op != "Conv" or index in layers)
        and all(_is_float(tensor) for tensor in data_inputs(node))
    }
    linked = nx.Graph()
    linked.add_nodes_from(members)
    for index in members:
        for tensor in graph.nodes[index].outputs:
            if _is_float(tensor):
                linked.add_edges_from((index, position[id(c)]) for c in tensor.outputs if position.get(id(c)) in members)
    regions = []
    for component in nx.connected_components(linked):
        nodes = tuple(sorted(component))
        convs = tuple(index for index in nodes if graph.nodes[index].op == "Conv")
        if convs:
            first = graph.nodes[nodes[0]]
            regions.append(Region(nodes, convs, first.name or first.outputs[0].name))
    return sorted(regions, key=lambda region: region.nodes[0])


def data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs of a region op that carry data (not scales, shapes, indices or bounds)."""
    positions = REGION_OPS[node.op]
    inputs = [tensor for tensor in node.inputs if tensor.name]
    return inputs if positions is None else [inputs[i] for i in positions if i < len(inputs)]


def region_tensors(model: Model, region: Region, layers: Mapping[int, Layer]) -> list[str]:
    """The activation tensors a region quantizes, producers before consumers: each op's computed data inputs and
    outputs, except a Conv's output that a Relu or Clip right after it reads (quantized after that instead) and the
    model's outputs (which keep float precision: the op writing one runs in float)."""
    graph = model.graph
    skipped = {layers[index].node.outputs[0].name for index in region.convs
             if quantized_output(layers[index]) is not layers[index].node.outputs[0]}
    skipped |= {tensor.name for tensor in graph.outputs}
    names: list[str] = []
    for index in region.nodes:
        node = graph.nodes[index]
        for tensor in [*data_inputs(node), *node.outputs]:
            if isinstance(tensor, gs.Variable) and _is_float(tensor) and tensor.name not in skipped:
                names.append(tensor.name)
    return list(dict.fromkeys(names))


def shared_ranges(model: Model, regions: Sequence[Region]) -> dict[str, str]:
    """For each output of a MOVING_OPS node in `regions`, the tensor whose quantization it takes (its input's, or
    that input's own source), so that onnxruntime can drop the pair around it."""
    graph = model.graph
    source: dict[str, str] = {}
    for index in sorted({index for region in regions for index in region.nodes}):
        node = graph.nodes[index]
        if node.op in MOVING_OPS:
            read = data_inputs(node)[0].name
            for output in node.outputs:
                source[output.name] = source.get(read, read)
    return source


class RegionBuilder:
    """Builds copies of one model with any choice of its regions in static int8, and the layers of `others` (layers
    outside the regions: a classifier's MatMul, an embedding) as that plan says.

    `layers` are the model's numbered layers; `activations` holds the calibrated quantization of every tensor the
    regions (and any static layer of `others`) quantize. A plan maps region indices (into `regions`) to the format
    of their Conv layers (static). `float_tensors` stay float inside the chosen regions, and with them the Conv
    layers that read or write one.
    """

    def __init__(
        self,
        model: Model,
        regions: Sequence[Region],
        layers: Mapping[int, Layer],
        others: Mapping[int, LayerFormat],
        weights: WeightQuantizer,
        activations: Mapping[str, ActivationQuantization],
        contrib_ops: bool,
        seven_bit_weights: bool = False,
    ):
        self.model = model
        self.regions = list(regions)
        self.layers = layers
        self.others = dict(others)
        self.weights = weights
        self.activations = activations
        self.contrib_ops = contrib_ops
        self.seven_bit_weights = seven_bit_weights  # see LayerRewriter

    def layer_plan(
        self, plan: Mapping[int, LayerFormat], float_tensors: frozenset[str] = frozenset()
    ) -> dict[int, LayerFormat]:
        """The per-layer plan `plan` amounts to: the Conv layers of its regions (but those reading or writing one of
        `float_tensors`), and `others`."""
        convs = {
            index: fmt
            for region, fmt in plan.items()
            for index in self.regions[region].convs
            if not {self.layers[index].activation.name, quantized_output(self.layers[index]).name} & float_tensors
        }
        return {**self.others, **convs}

    def tensors(self, plan: Mapping[int, LayerFormat]) -> list[str]:
        """The tensors the regions of `plan` quantize, in graph order."""
        return [name for index in sorted(plan) for name in region_tensors(self.model, self.regions[index], self.layers)]

    def build(self, plan: Mapping[int, LayerFormat], float_tensors: frozenset[str] = frozenset()) -> Model:
        """A copy of the model with the regions of `plan` in int8 (but `float_tensors`) and `others` quantized; the
        model is untouched."""
        copy = self.model.copy()
        rewriter = LayerRewriter(copy, self.weights, self.activations, self.contrib_ops, self.seven_bit_weights)
        nodes = model_nodes(copy)
        chosen = [self.regions[index] for index in sorted(plan)]
        for index, fmt in sorted(self.layer_plan(plan, float_tensors).items()):
            graph, node = nodes[index]
            rewriter.rewrite(dataclasses.replace(self.layers[index], node=node), fmt, graph)
        tensors = copy.graph.tensors()
        for name in self.tensors(plan):
            if name not in float_tensors:
                rewriter.static_activation(tensors[name])
        for region in chosen:
            for index in region.nodes:
                node = nodes[index][1]
                if node.op in CONSTANT_OPERAND_OPS and not {t.name for t in node.outputs} & float_tensors:
                    for position, tensor in enumerate(node.inputs):
                        if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32:
                            node.inputs[position] = rewriter.static_constant(tensor)
        copy.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return copy


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32
