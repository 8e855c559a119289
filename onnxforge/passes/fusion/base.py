"""What every fusion pass shares: rewrite rules applied to all graphs, aware of the opset and the backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from onnxforge.ir import Model, infer_shapes
from onnxforge.ir.patterns import RewriteRule, apply_rules
from onnxforge.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class FusionContext:
    """What a rule's condition or replacement may need to know about where the model will run.

    opset: the model's default-domain opset; backend: "ort" may use onnxruntime's com.microsoft contrib ops,
    any other backend (TVM) gets standard ONNX ops only.
    """

    opset: int
    backend: str

    @property
    def contrib_ops(self) -> bool:
        return self.backend == "ort"


class RuleBasedPass(Pass):
    """A pass made of rewrite rules. Subclasses list `rules`; `order` places the pass inside `fuse`."""

    rules: ClassVar[Sequence[RewriteRule]] = ()
    order: ClassVar[int] = 100
    needs_shapes: ClassVar[bool] = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.needs_shapes:
            infer_shapes(model)
        context = FusionContext(opset=model.graph.opset, backend=ctx.backend)
        graphs = list(model.graphs())
        counts = apply_rules(graphs, self.rules, context)
        if counts:  # values only the replaced nodes read (shape arithmetic, say) are dead now
            for graph in graphs:
                graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False, recurse_functions=False)
        return PassResult(changed=bool(counts), stats=dict(counts))


def fusion_passes() -> list[type[RuleBasedPass]]:
    """Every registered fusion pass, in the order `fuse` runs them."""
    from onnxforge.passes.registry import available_passes

    passes = [cls for cls in available_passes().values() if issubclass(cls, RuleBasedPass)]
    return sorted(passes, key=lambda cls: (cls.order, cls.name))
