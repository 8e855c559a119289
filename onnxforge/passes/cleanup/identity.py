"""Remove nodes that pass their input through unchanged: Identity, and Dropout at inference."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.edit import bypass_node
from onnxforge.ir.ops import is_onnx_op
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass


@register_pass("remove-identity")
class RemoveIdentity(Pass):
    """Remove Identity nodes and inference-mode Dropout, rewiring their consumers to the input."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = 0
        for graph in model.graphs():
            bypassed = {
                id(node) for node in list(graph.nodes) if _is_pass_through(node, graph) and bypass_node(graph, node)
            }
            graph.nodes = [node for node in graph.nodes if id(node) not in bypassed]
            removed += len(bypassed)
        return PassResult(changed=removed > 0, stats={"identity_nodes_removed": removed})


def _is_pass_through(node: gs.Node, graph: gs.Graph) -> bool:
    if not is_onnx_op(node, "Identity", "Dropout") or not node.inputs or not node.outputs:
        return False
    if node.op == "Identity":
        return isinstance(node.inputs[0], gs.Tensor) and node.inputs[0].name != ""
    if node.op == "Dropout":
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        mask_used = mask is not None and (bool(mask.outputs) or mask in graph.outputs)
        return not mask_used and _training_off(node)
    return False


def _training_off(node: gs.Node) -> bool:
    """Dropout is the identity unless its training_mode input is present and not constant False."""
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        return True
    mode = node.inputs[2]
    return isinstance(mode, gs.Constant) and not bool(np.asarray(mode.values).any())
