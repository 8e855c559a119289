"""Questions about a node's operator that many passes ask."""

from __future__ import annotations

import onnx_graphsurgeon as gs

ONNX_DOMAINS = (None, "", "ai.onnx")
CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators


def is_onnx_op(node: gs.Node, *op_types: str) -> bool:
    """True if `node` is a standard ONNX operator (default domain), and one of `op_types` when given."""
    return node.domain in ONNX_DOMAINS and (not op_types or node.op in op_types)
