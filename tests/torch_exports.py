"""Export a torch module the two ways `torch.onnx.export` offers, with dynamic axes, and run an export as it is.

Shared by the zoo's builders (transformer_exports.py, cnn_exports.py) and their tests.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

EXPORTERS = ("torchscript", "dynamo")


def export_dynamic(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_axes: tuple[str, dict[int, str]],
    dynamic: dict[str, dict[int, str]],
    exporter: str,
    opset: int,
    folding: bool = True,
) -> onnx.ModelProto:
    """`module` exported by `exporter`: "torchscript" with `dynamic_axes`, or "dynamo" with `Dim.AUTO` dynamic
    shapes for the axes `dynamic` names (input name -> {axis: symbolic name}); one output, named and with dynamic
    axes as `output_axes` says. folding=False turns the exporter's own graph optimization off."""
    output, axes = output_axes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(module, inputs, buffer, input_names=input_names, output_names=[output],
                              dynamic_axes={**dynamic, output: axes}, opset_version=opset, dynamo=False,
                              do_constant_folding=folding)
            return onnx.load_from_string(buffer.getvalue())
        dims = {name: torch.export.Dim.AUTO for named in dynamic.values() for name in named.values()}
        shapes = tuple({axis: dims[name] for axis, name in dynamic[n].items()} for n in input_names)
        program = torch.onnx.export(module, inputs, input_names=input_names, output_names=[output],
                                    dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False,
                                    optimize=folding)
        return program.model_proto


def run_as_exported(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs in onnxruntime with its graph optimizations off (they would hide a difference)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def op_counts(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op type the main graph has."""
    return Counter(node.op_type for node in model.graph.node)
