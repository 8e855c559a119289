"""Remove nodes whose results no graph output needs, and weights no node reads."""

from __future__ import annotations

from onnxforge.ir import Model
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass


@register_pass("remove-dead")
class RemoveDeadCode(Pass):
    """Remove dead nodes and unused initializers (nested subgraphs included); graph inputs are kept."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = model.stats()
        constants_before = _constant_names(model)
        model.graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True, recurse_functions=False)
        after = model.stats()
        removed_nodes = before.nodes - after.nodes
        removed_weights = len(constants_before - _constant_names(model))
        return PassResult(
            changed=bool(removed_nodes or removed_weights),
            stats={"dead_nodes_removed": removed_nodes, "initializers_removed": removed_weights},
        )


def _constant_names(model: Model) -> set[str]:
    import onnx_graphsurgeon as gs

    return {
        name for graph in model.graphs() for name, t in graph.tensors().items() if isinstance(t, gs.Constant)
    }
