"""The table from (domain, op type) to a torch implementation, and what every implementation shares.

An implementation takes the node's `OpCall` (attributes, opset, which outputs are used) and its input tensors
(None for an absent optional input) and returns one tensor or a sequence with one entry per output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch

from onnxforge.errors import PassError

ONNX_DOMAINS = ("", "ai.onnx")

Output = torch.Tensor | Sequence[torch.Tensor | None]


class TorchConversionError(PassError):
    """The model holds what the torch evaluation of a graph cannot run: an op without a torch implementation,
    an attribute value it does not implement, or a subgraph (If, Loop, Scan)."""


@dataclass(frozen=True)
class OpCall:
    """What an op implementation knows of its node besides its inputs.

    attrs: the node's attributes (tensors as numpy arrays); opset: the opset of the node's domain;
    given_inputs and used_outputs: for each input and output the node lists, whether it is named (an unnamed
    optional input is absent; an unnamed output is not computed, by onnxruntime either); input_types: the
    ONNX element type of each input where the graph says (4-bit codes compute as 8-bit tensors: only this
    tells them apart), else None.
    """

    name: str
    op: str
    attrs: dict[str, Any]
    opset: int
    given_inputs: tuple[bool, ...]
    used_outputs: tuple[bool, ...]
    input_types: tuple[int | None, ...] = ()

    def input_type(self, index: int) -> int | None:
        return self.input_types[index] if index < len(self.input_types) else None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


@dataclass(frozen=True)
class TorchOp:
    """An implementation and what the table says about its inputs.

    fixed_inputs: positions of inputs that configure the op (sizes, scales to resize by, a pad value, a
    quantized weight's scales): a float initializer there is never trained. refuse: a check of the node's
    attributes and outputs that names what the implementation does not cover (None when it covers the node).
    """

    run: Callable[..., Output]
    fixed_inputs: tuple[int, ...] = ()
    refuse: Callable[[OpCall], str | None] | None = None


@dataclass
class OpTable:
    """Implementations by (domain, op type); `op` registers one for several op types."""

    ops: dict[tuple[str, str], TorchOp] = field(default_factory=dict)

    def op(
        self,
        *op_types: str,
        domain: str = "",
        fixed_inputs: tuple[int, ...] = (),
        refuse: Callable[[OpCall], str | None] | None = None,
    ) -> Callable[[Callable[..., Output]], Callable[..., Output]]:
        def register(run: Callable[..., Output]) -> Callable[..., Output]:
            for op_type in op_types:
                self.ops[(domain, op_type)] = TorchOp(run, fixed_inputs, refuse)
            return run

        return register

    def merged(self, *others: OpTable) -> OpTable:
        table = OpTable(dict(self.ops))
        for other in others:
            table.ops.update(other.ops)
        return table

    def get(self, domain: str, op_type: str) -> TorchOp | None:
        return self.ops.get(("" if domain in ONNX_DOMAINS else domain, op_type))


def ints(tensor: torch.Tensor | None) -> list[int]:
    """The values of a shape, axes or sizes tensor as Python ints (empty for an absent input)."""
    if tensor is None:
        return []
    return [int(v) for v in tensor.reshape(-1).tolist()]


def scalar(tensor: torch.Tensor) -> float | int | bool:
    """The one value of a scalar (or one-element) tensor."""
    return tensor.reshape(-1)[0].item()


_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(onnx_type: int) -> torch.dtype | None:
    """The torch dtype of an ONNX element type; None for those torch cannot compute with (strings, 4-bit,
    8-bit floats, complex numbers)."""
    return _TORCH_DTYPES.get(onnx_type)


def normalized_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
