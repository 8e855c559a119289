"""Quantized copies of one model for any choice of layers, with each weight quantized only once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.layers import Layer
from onnxforge.passes.layers import find_layers
from onnxforge.passes.quantization.adaround import adaround
from onnxforge.passes.quantization.rewrite import ActivationQuantization, LayerFormat, LayerRewriter
from onnxforge.passes.quantization.weights import QuantizedWeight, QuantSpec, gptq_quantize, quantize_weight

Plan = Mapping[int, LayerFormat]  # layer index (its node's position in model_nodes) -> format


def model_nodes(model: Model) -> list[tuple[gs.Graph, gs.Node]]:
    """Every node of the model with the graph that holds it: the main graph's first, then each subgraph's (If, Loop
    and Scan bodies) in the order Model.graphs yields them, which a copy of the model keeps."""
    return [(graph, node) for graph in model.graphs() for node in graph.nodes]


def numbered_layers(model: Model) -> dict[int, Layer]:
    """The layers of the main graph and of every subgraph, by their node's position in model_nodes: the main
    graph's come first, so a layer numbered len(model.graph.nodes) or more lives in a subgraph."""
    position = {id(node): index for index, (_, node) in enumerate(model_nodes(model))}
    return {position[id(layer.node)]: layer for graph in model.graphs() for layer in find_layers(graph)}


class WeightQuantizer:
    """Quantizes layer weights by round-to-nearest, an error-minimizing search, GPTQ or AdaRound; caches every result.

    `hessians` (for GPTQ and AdaRound: XᵀX of the rows the layer reads, over its matrix view's inputs) and
    `input_energy` (for the search) come from calibration activations, by weight name. AdaRound rounds on the
    search's grid; a layer without a hessian gets the search alone.
    """

    def __init__(
        self,
        method: str,
        hessians: Mapping[str, np.ndarray] | None = None,
        input_energy: Mapping[str, np.ndarray] | None = None,
    ):
        self.method = method
        self.hessians = hessians or {}
        self.input_energy = input_energy or {}
        self._cache: dict[tuple[str, QuantSpec], QuantizedWeight] = {}

    def __call__(self, layer: Layer, spec: QuantSpec) -> QuantizedWeight:
        key = (layer.weight.name, spec)
        if key not in self._cache:
            self._cache[key] = self._quantize(layer, spec)
        return self._cache[key]

    def _quantize(self, layer: Layer, spec: QuantSpec) -> QuantizedWeight:
        values = np.asarray(layer.weight.values, np.float32)
        axis = layer.in_axis if spec.granularity == "block" else layer.out_axis
        name = layer.weight.name
        if self.method == "gptq" and layer.op == "MatMul" and name in self.hessians:
            return gptq_quantize(values, self.hessians[name], spec)
        if self.method in ("search", "gptq", "adaround"):
            energy = self.input_energy.get(name) if layer.op == "MatMul" else None
            searched = quantize_weight(values, spec, axis, method="search", input_energy=energy)
            if self.method == "adaround" and name in self.hessians:
                return adaround(values, searched, self.hessians[name], layer.out_axis)
            return searched
        return quantize_weight(values, spec, axis)


class CandidateBuilder:
    """Builds quantized copies of `model` (whose layers are `layers`) for any plan."""

    def __init__(
        self,
        model: Model,
        weights: WeightQuantizer,
        activations: Mapping[str, ActivationQuantization],
        contrib_ops: bool,
        seven_bit_weights: bool = False,
    ):
        self.model = model
        self.weights = weights
        self.activations = activations
        self.contrib_ops = contrib_ops
        self.seven_bit_weights = seven_bit_weights  # see LayerRewriter
        self.layers = numbered_layers(model)

    def build(self, plan: Plan) -> Model:
        """A copy of the model with the layers of `plan` quantized as it says; the model itself is untouched."""
        copy = self.model.copy()
        rewriter = LayerRewriter(copy, self.weights, self.activations, self.contrib_ops, self.seven_bit_weights)
        nodes = model_nodes(copy)
        for index, fmt in sorted(plan.items()):
            graph, node = nodes[index]
            rewriter.rewrite(dataclasses.replace(self.layers[index], node=node), fmt, graph)
        copy.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return copy

