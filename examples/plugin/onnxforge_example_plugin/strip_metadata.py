"""`strip-metadata`: remove the text a model carries beside its computation (doc strings, metadata entries)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxforge import Model, Pass, PassContext, PassResult, register_pass


@register_pass("strip-metadata")
class StripMetadata(Pass):
    """Remove doc strings (model, graphs, subgraphs, functions) and metadata_props entries: text no runtime reads."""

    lossless = True  # only text changes: the pass manager still checks that the outputs did not

    @dataclass
    class Options:
        # The metadata_props keys to remove (strip-metadata:keys=author+source); None: every entry, empty: none.
        keys: list[str] | None = None
        # Also remove the doc strings (strip-metadata:doc_strings=false keeps them).
        doc_strings: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        doc_strings = self._strip_doc_strings(model) if self.options.doc_strings else 0
        removed_keys = self._strip_metadata(model)
        notes = [f"removed metadata {', '.join(removed_keys)}"] if removed_keys else []
        stats = {"doc_strings_removed": doc_strings, "metadata_removed": len(removed_keys)}
        return PassResult(changed=bool(doc_strings or removed_keys), stats=stats, notes=notes)

    def _strip_doc_strings(self, model: Model) -> int:
        """Empty every doc string a saved model keeps; return how many were not empty. Nodes have none here:
        onnx-graphsurgeon drops node doc strings when it reads a model."""
        removed = 0
        if model.header.doc_string:
            model.header.doc_string = ""
            removed += 1
        for graph in (*model.graphs(), *model.graph.functions):
            if graph.doc_string:
                graph.doc_string = ""
                removed += 1
        return removed

    def _strip_metadata(self, model: Model) -> list[str]:
        """Remove the metadata_props entries the options name; return their keys."""
        wanted = self.options.keys
        entries = model.header.metadata_props
        removed = [entry.key for entry in entries if wanted is None or entry.key in wanted]
        if removed:
            kept = [(entry.key, entry.value) for entry in entries if entry.key not in removed]
            del entries[:]
            for key, value in kept:
                entries.add(key=key, value=value)
        return removed
