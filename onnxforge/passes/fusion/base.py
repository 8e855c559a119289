"""What every fusion pass shares: rewrite rules applied to all graphs, aware of the opset and the backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from onnxforge.ir import Model
from onnxforge.ir.patterns import RewriteRule, apply_rules, near_misses
from onnxforge.pipeline.analyses import InferredShapes
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext


@dataclass(frozen=True)
class FusionContext:
    """What a rule's condition or replacement may need to know about where the model will run.

    opset: the model's default-domain opset; contrib_ops: the backend runs every onnxruntime contrib op
    (com.microsoft) the rules write (`FUSED_CONTRIB_OPS`), so they may use them; otherwise (TVM) standard ONNX
    ops only.
    """

    opset: int
    contrib_ops: bool


# The com.microsoft ops fusion rules write where the backend runs them all.
FUSED_CONTRIB_OPS = (
    "Attention", "BiasGelu", "FastGelu", "Gelu", "MultiHeadAttention", "QuickGelu", "SkipLayerNormalization"
)
# Why a rule that would write one of them declines on other backends (what `--explain` says).
NO_CONTRIB_OPS = "the backend does not run onnxruntime's contrib ops (com.microsoft)"


class RuleBasedPass(Pass):
    """A pass made of rewrite rules. Subclasses list `rules`; `FUSION_STAGES` places the pass inside `fuse`."""

    rules: ClassVar[Sequence[RewriteRule]] = ()
    needs_shapes: ClassVar[bool] = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.needs_shapes:
            ctx.analysis(InferredShapes, model)
        contrib_ops = ctx.runtime.capabilities.runs_contrib_ops(*FUSED_CONTRIB_OPS)
        context = FusionContext(opset=model.graph.opset, contrib_ops=contrib_ops)
        graphs = list(model.graphs())
        counts = apply_rules(graphs, self.rules, context)
        if counts:  # values only the replaced nodes read (shape arithmetic, say) are dead now
            for graph in graphs:
                graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False, recurse_functions=False)
        # What `--explain` shows: where a rule's pattern is in the model as it is now, and why it was left.
        notes = near_misses(graphs, self.rules, context).lines()
        return PassResult(changed=bool(counts), stats=dict(counts), notes=notes)

    def parts(self) -> list[Pass]:
        """One pass per rule, so that a rule that breaks the model costs only its own rewrites."""
        if len(self.rules) < 2:
            return []
        parts = []
        for rule in self.rules:
            part = type(self)(self.options)
            part.rules = (rule,)
            parts.append(part)
        return parts

    def describe(self) -> str:
        """The pass as written on the command line; a part of it (see `parts`) adds its rule: `fuse-x/rule`."""
        whole = super().describe()
        return f"{whole}/{self.rules[0].name}" if "rules" in vars(self) else whole

