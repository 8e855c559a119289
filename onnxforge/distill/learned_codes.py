"""Integer weight codes that a TorchGraph trains as floats: which integer initializers hold them, and how their
stored values unpack to one float a code and pack back.

Two kinds of initializer hold trainable codes: the integer codes (int8, uint8, int16, uint16, int4, uint4) that a
DequantizeLinear with a constant scale reads as its input 0, and MatMulNBits' packed weight (input 1: uint8, two
4-bit codes a byte with the first in the low nibble, or one 8-bit code a byte), each only where no other node or
input slot reads it. The graph reads the codes rounded (the gradient passing straight through) and clamped to the
code type's range; writing back rounds and clips them the same way and stores them in the initializer's own
dtype, shape and packing. The float codes keep every stored code, MatMulNBits' padding past K in its last block
too (the op never reads it, so it keeps its value), so unpacking and packing again gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.distill.contrib_ops import CONTRIB_DOMAIN
from onnxforge.distill.op_table import ONNX_DOMAINS
from onnxforge.distill.quantized_ops import CODE_RANGES, rounded_straight_through

T = onnx.TensorProto
# Code types a float32 holds exactly (int32 codes, a quantized bias's, do not all fit its 24-bit mantissa).
TRAINED_CODE_TYPES = frozenset({T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT4, T.UINT4})
_FOUR_BIT = ("int4", "uint4")


@dataclass(frozen=True)
class CodeLayout:
    """How an initializer stores the codes its float parameter trains: its numpy dtype and shape, the range of a
    code, and whether each byte holds two 4-bit codes (low nibble first) along the last axis."""

    dtype: np.dtype
    shape: tuple[int, ...]
    low: int
    high: int
    nibbles: bool = False

    @property
    def code_shape(self) -> tuple[int, ...]:
        """The shape of the float codes: the stored shape, with the last axis doubled for two codes a byte."""
        return (*self.shape[:-1], 2 * self.shape[-1]) if self.nibbles else self.shape

    def unpacked(self, stored: np.ndarray) -> np.ndarray:
        """The codes of the stored values, one float32 each."""
        if self.nibbles:
            stored = np.stack([stored & 0x0F, stored >> 4], axis=-1).reshape(self.code_shape)
        return stored.astype(np.float32)

    def rounded(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes the graph reads: rounded (half to even, the gradient passing straight through) and clamped
        to the code range."""
        return torch.clamp(rounded_straight_through(codes), self.low, self.high)

    def stored(self, codes: np.ndarray) -> np.ndarray | LazyValues:
        """The values an initializer of this layout stores for float codes: rounded, clipped to the range,
        packed and typed as it was."""
        values = np.clip(np.round(codes), self.low, self.high).reshape(self.code_shape)
        if self.nibbles:
            pairs = values.astype(np.uint8).reshape(*self.shape, 2)
            return pairs[..., 0] | (pairs[..., 1] << 4)
        values = values.astype(self.dtype)
        if self.dtype.name in _FOUR_BIT:
            # graphsurgeon exports a numpy array of 4-bit codes a byte each: hand it the packed tensor instead.
            return LazyValues(onnx.numpy_helper.from_array(values))
        return values


def trained_code_layouts(graph: gs.Graph, arrays: Mapping[str, np.ndarray]) -> dict[str, CodeLayout]:
    """The initializers (`arrays`: every constant's values by name) that hold trainable codes, and the layout
    of each: those that every node reading them reads as codes, in one layout, and that are no graph output."""
    layouts: dict[str, CodeLayout | None] = {}
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                layout = _codes_read(node, index, arrays[tensor.name])
                if layouts.setdefault(tensor.name, layout) != layout:
                    layouts[tensor.name] = None
    outputs = {t.name for t in graph.outputs}
    return {name: layout for name, layout in layouts.items() if layout is not None and name not in outputs}


def _codes_read(node: gs.Node, index: int, values: np.ndarray) -> CodeLayout | None:
    """The layout in which `node` reads the constant `values` at input `index` as codes; None when it reads
    them otherwise."""
    domain = node.domain or ""
    if node.op == "DequantizeLinear" and domain in ONNX_DOMAINS and index == 0:
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            return None
        try:
            code_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        except (KeyError, TypeError, ValueError):
            return None
        if code_type not in TRAINED_CODE_TYPES:
            return None
        return CodeLayout(values.dtype, values.shape, *CODE_RANGES[code_type])
    if node.op == "MatMulNBits" and domain == CONTRIB_DOMAIN and index == 1 and values.dtype == np.uint8:
        bits = node.attrs.get("bits", 4)
        return CodeLayout(values.dtype, values.shape, 0, 2**bits - 1, nibbles=bits == 4)
    return None
