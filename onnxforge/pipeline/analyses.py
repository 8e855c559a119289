"""Analyses that passes ask the pass context for, computed once and cached until the graph changes."""

from __future__ import annotations

import networkx as nx

from onnxforge.ir import Model, to_networkx
from onnxforge.pipeline.base import Analysis


class GraphView(Analysis):
    """The main graph's data flow as a networkx MultiDiGraph (see `onnxforge.ir.to_networkx`)."""

    @classmethod
    def compute(cls, model: Model) -> nx.MultiDiGraph:
        return to_networkx(model.graph)
