"""Move a model to a newer opset, where newer ops and forms exist (LayerNormalization from 17, per-channel
and blocked quantization from 13 and 21)."""

from __future__ import annotations

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
    """A copy of `model` with its default-domain ops converted to opset `target` by onnx's version converter;
    PassError when the converter cannot adapt an op."""
    try:
        converted = onnx.version_converter.convert_version(model.to_proto(), target)
    except Exception as exc:  # the converter raises bare RuntimeErrors for ops it cannot adapt
        raise PassError(f"onnx's version converter cannot move this model to opset {target}: {exc}") from None
    return load_model(converted)
