"""Merge weights that hold the same bytes, so each is stored (and quantized, and loaded) once."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir import Model
from onnxforge.ir.edit import replace_uses
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass


@register_pass("merge-initializers")
class MergeDuplicateInitializers(Pass):
    """Make nodes that read identical constants (same dtype, shape and bytes) share one."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        merged = 0
        saved = 0
        for graph in model.graphs():
            protected = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
            candidates: dict[tuple, list[gs.Constant]] = defaultdict(list)
            for tensor in _local_constants(graph):
                layout = _layout(tensor)
                if tensor.name not in protected and layout[0] not in ("object", "str"):  # strings: not worth it
                    candidates[layout].append(tensor)
            for same_layout in candidates.values():
                if len(same_layout) < 2:
                    continue  # unique shape and dtype: no need to read its bytes
                groups: dict[str, list[gs.Constant]] = defaultdict(list)
                for tensor in same_layout:
                    groups[_digest(tensor)].append(tensor)
                for tensors in groups.values():
                    keep = tensors[0]
                    for duplicate in tensors[1:]:
                        if _same_bytes(keep, duplicate) and replace_uses(graph, duplicate, keep):
                            merged += 1
                            saved += int(duplicate._values.nbytes)
        return PassResult(changed=merged > 0, stats={"initializers_merged": merged, "bytes_saved": saved})


def _local_constants(graph: gs.Graph) -> list[gs.Constant]:
    seen: dict[int, gs.Constant] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _layout(tensor: gs.Constant) -> tuple:
    """dtype and shape, read without loading lazy values."""
    values = tensor._values
    return (str(values.dtype), tuple(int(d) for d in values.shape))


def _digest(tensor: gs.Constant) -> str:
    values = np.ascontiguousarray(tensor.values)
    return hashlib.blake2b(values.view(np.uint8).reshape(-1) if values.size else b"", digest_size=16).hexdigest()


def _same_bytes(a: gs.Constant, b: gs.Constant) -> bool:
    x, y = _contiguous(a), _contiguous(b)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _contiguous(tensor: gs.Constant) -> np.ndarray:
    # np.ascontiguousarray turns a scalar into shape (1,): a scalar and a one-element vector must not merge.
    values = np.asarray(tensor.values)
    return np.ascontiguousarray(values).reshape(values.shape)
