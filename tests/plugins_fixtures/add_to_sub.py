"""A broken plugin for the CLI tests: claims to be lossless but turns every Add into a Sub."""

from onnxforge.pipeline import Pass, PassResult, register_pass


@register_pass("test-add-to-sub")
class AddToSub(Pass):
    """Turn every Add into a Sub (wrong on purpose: the verifier must catch it)."""

    lossless = True

    def run(self, model, ctx):
        changed = 0
        for node in model.graph.nodes:
            if node.op == "Add":
                node.op = "Sub"
                changed += 1
        return PassResult(changed=changed > 0, stats={"adds_turned_into_subs": changed})
