"""Move a model to a newer opset, where newer ops and forms exist (LayerNormalization from 17, per-channel
and blocked quantization from 13 and 21)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import onnx
import onnx.version_converter

from onnxforge.errors import PassError
from onnxforge.ir import Model, load_model
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass

LATEST_OPSET = onnx.defs.onnx_opset_version()


@register_pass("upgrade-opset")
class UpgradeOpset(Pass):
    """Convert the model's default-domain ops to opset `to` with onnx's version converter (never downgrades)."""

    @dataclass
    class Options:
        to: int = 21

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        target, current = self.options.to, model.graph.opset
        if not 1 <= target <= LATEST_OPSET:
            raise PassError(f"upgrade-opset:to={target}: choose an opset from 1 to {LATEST_OPSET}")
        if current >= target:
            return PassResult(False, notes=[f"the model is at opset {current} already"])
        moved = upgraded(model, target)
        model.graph, model.header = moved.graph, moved.header
        return PassResult(True, stats={"opset_from": current, "opset_to": target})


def upgraded(model: Model, target: int) -> Model:
    """A copy of `model` with its default-domain ops converted to opset `target` by onnx's version converter,
    the bodies of its local functions too; PassError when the converter cannot adapt an op."""
    proto = model.to_proto()
    converted = _converted(proto, target, "this model")
    # The converter drops the model's local functions: their bodies are converted one by one and put back.
    converted.functions.extend(_upgraded_function(function, proto.ir_version, target) for function in proto.functions)
    return load_model(converted)


def _converted(proto: onnx.ModelProto, target: int, what: str) -> onnx.ModelProto:
    try:
        return onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors for ops it cannot adapt
        raise PassError(f"onnx's version converter cannot move {what} to opset {target}: {exc}") from None


def _upgraded_function(function: onnx.FunctionProto, ir_version: int, target: int) -> onnx.FunctionProto:
    """`function` with the default-domain ops of its body converted to opset `target`. An op that the conversion
    changes may not take an attribute from the caller: the converter would adapt it without seeing its value."""
    source = next((o.version for o in function.opset_import if o.domain in ("", "ai.onnx")), target)
    if source >= target:
        return function
    name = f"local function {function.domain}:{function.name}"
    for node in _nodes_within(function.node):
        referenced = [a.name for a in node.attribute if a.ref_attr_name]
        if referenced and node.domain in ("", "ai.onnx") and _changes(node.op_type, source, target):
            raise PassError(f"onnx's version converter cannot move {name} to opset {target}: its {node.op_type} "
                            f"takes {', '.join(referenced)} from the caller")
    body = onnx.helper.make_graph(
        function.node, function.name, [onnx.ValueInfoProto(name=n) for n in function.input],
        [onnx.ValueInfoProto(name=n) for n in function.output])
    wrapper = onnx.helper.make_model(body, opset_imports=function.opset_import, ir_version=ir_version)
    graph = _converted(wrapper, target, name).graph
    upgraded = onnx.FunctionProto()
    upgraded.CopyFrom(function)
    del upgraded.node[:]
    upgraded.node.extend(onnx.helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer)
    upgraded.node.extend(graph.node)
    for opset in upgraded.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = target
    return upgraded


def _nodes_within(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """`nodes` and the nodes of their subgraphs (If branches, Loop and Scan bodies), at any depth."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _nodes_within(graph.node)


def _changes(op_type: str, source: int, target: int) -> bool:
    """Whether the default-domain op `op_type` has a different definition at opset `target` than at `source`."""
    try:
        return onnx.defs.get_schema(op_type, source).since_version != onnx.defs.get_schema(op_type, target).since_version
    except onnx.defs.SchemaError:
        return True
