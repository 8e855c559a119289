"""Analyses that passes ask the pass context for, computed once and cached until the graph changes."""

from __future__ import annotations

import networkx as nx

from onnxforge.ir import Model, ShapeInferenceResult, infer_shapes, to_networkx
from onnxforge.pipeline.base import Analysis


class GraphView(Analysis):
    """The main graph's data flow as a networkx MultiDiGraph (see `onnxforge.ir.to_networkx`)."""

    @classmethod
    def compute(cls, model: Model) -> nx.MultiDiGraph:
        return to_networkx(model.graph)


class InferredShapes(Analysis):
    """The model's tensors carry the shapes and dtypes onnx's inference gives them (`onnxforge.ir.infer_shapes`,
    in place): a pass that asks for it infers them again only when a pass changed the model since."""

    @classmethod
    def compute(cls, model: Model) -> ShapeInferenceResult:
        return infer_shapes(model)
