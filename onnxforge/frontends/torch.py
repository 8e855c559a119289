"""The PyTorch frontend: export a module with example inputs through torch.onnx.export (needs the torch extra)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from onnxforge.errors import OnnxforgeError
from onnxforge.ir import Model, load_model


def from_torch(
    module: Any,
    example_inputs: Any,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = 17,
    **export_options: Any,
) -> Model:
    """Export `module` (put in eval mode) called on `example_inputs` (a tensor or tuple) to the IR.

    Uses the TorchScript-based exporter, which needs nothing beyond torch; dynamic_axes names the
    dimensions that stay symbolic, e.g. {"x": {0: "batch"}}. Other keyword arguments go to
    torch.onnx.export (for example do_constant_folding=False).
    """
    try:
        import torch
    except ImportError:
        raise OnnxforgeError("the PyTorch frontend needs torch: pip install 'onnxforge[torch]'") from None
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example_inputs,
            buffer,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()} if dynamic_axes else None,
            opset_version=opset,
            dynamo=False,
            **export_options,
        )
    return load_model(buffer.getvalue())
