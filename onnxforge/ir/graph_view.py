"""A networkx view of a graph's data flow, for analyses (dominators, channel groups, reachability)."""

from __future__ import annotations

import networkx as nx
import onnx_graphsurgeon as gs


def to_networkx(graph: gs.Graph) -> nx.MultiDiGraph:
    """Return a multigraph with one vertex per node (keyed by position in `graph.nodes`, attribute `node`)
    and one edge per tensor flowing from its producer to each consumer (key and attribute `tensor`: the name).

    Graph inputs and outputs appear as vertices `("input", name)` and `("output", name)`; constants are
    not vertices, since they carry no data flow.
    """
    view = nx.MultiDiGraph()
    index = {id(node): i for i, node in enumerate(graph.nodes)}
    for i, node in enumerate(graph.nodes):
        view.add_node(i, node=node)
    for tensor in graph.inputs:
        view.add_node(("input", tensor.name))
    for tensor in graph.outputs:
        view.add_node(("output", tensor.name))
    graph_inputs = {t.name for t in graph.inputs}
    for i, node in enumerate(graph.nodes):
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) or not tensor.name:
                continue
            producers = [index[id(p)] for p in tensor.inputs if id(p) in index]
            if tensor.name in graph_inputs:
                producers.append(("input", tensor.name))
            for producer in producers:
                view.add_edge(producer, i, key=tensor.name, tensor=tensor.name)
    for tensor in graph.outputs:
        sources = [index[id(p)] for p in tensor.inputs if id(p) in index]
        if tensor.name in graph_inputs:
            sources.append(("input", tensor.name))
        for source in sources:
            view.add_edge(source, ("output", tensor.name), key=tensor.name, tensor=tensor.name)
    return view
