"""Torch implementations of the quantization ops: QDQ as fake quantization, and onnxruntime's dequantizing
weight ops (MatMulNBits, GatherBlockQuantized).

QuantizeLinear and DynamicQuantizeLinear produce their integer codes as float tensors: rounding passes the
gradient straight through (STE) and saturation passes it only inside the range, so a QDQ model trains through
its quantizers, and a DequantizeLinear's float scale of several values (one per channel) can be a parameter.
MatMulNBits and GatherBlockQuantized weights are dequantized on every call. MatMulNBits' scales and bias can be
parameters, and its weight comes either packed or, where TorchGraph trains the codes, unpacked as float codes
(one a code, rounded and clamped already; onnxforge.distill.learned_codes), as a DequantizeLinear's integer codes
do; its zero points are fixed inputs. GatherBlockQuantized's codes, scales and zero points are fixed inputs.
"""

from __future__ import annotations

import math

import onnx
import torch

from onnxforge.distill.op_table import OpCall, OpTable, normalized_axis
from onnxforge.distill.contrib_ops import CONTRIB_DOMAIN

OPS = OpTable()

T = onnx.TensorProto
# The codes each quantized element type holds (QuantizeLinear saturates to them).
CODE_RANGES = {
    T.UINT8: (0, 255),
    T.INT8: (-128, 127),
    T.UINT16: (0, 65535),
    T.INT16: (-32768, 32767),
    T.UINT4: (0, 15),
    T.INT4: (-8, 7),
    T.INT32: (-(2**31), 2**31 - 1),
}


def rounded_straight_through(x: torch.Tensor) -> torch.Tensor:
    """round(x) (half to even, as ONNX rounds) whose gradient is the identity."""
    return x + (torch.round(x) - x).detach()


def _along(parameter: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """A quantization scale or zero point broadcast to x: one value, one per index of `axis`, or (block_size)
    one per block of that many indices along `axis`."""
    if parameter.numel() == 1 and not block_size:
        return parameter.reshape(())
    axis = normalized_axis(axis, x.dim())
    if block_size:
        return parameter.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return parameter.reshape(shape)


def _code_type(call: OpCall) -> int:
    """The element type QuantizeLinear writes: its zero point's, else output_dtype, else uint8."""
    return call.input_type(2) or call.attr("output_dtype") or T.UINT8


def _quantize_refusal(call: OpCall) -> str | None:
    code_type = _code_type(call)
    if code_type not in CODE_RANGES:
        return f"QuantizeLinear to ONNX element type {code_type} is not implemented (integer codes are)"
    return None


@OPS.op("QuantizeLinear", fixed_inputs=(2,), refuse=_quantize_refusal)
def _quantize(call: OpCall, x, scale, zero_point=None):
    axis, block_size = call.attr("axis", 1), call.attr("block_size", 0)
    low, high = CODE_RANGES[_code_type(call)]
    scale = _along(scale, x, axis, block_size)
    codes = rounded_straight_through(x / scale)
    if zero_point is not None:
        codes = codes + _along(zero_point, x, axis, block_size).to(codes.dtype)
    return torch.clamp(codes, low, high)


@OPS.op("DequantizeLinear", fixed_inputs=(2,))
def _dequantize(call: OpCall, x, scale, zero_point=None):
    axis, block_size = call.attr("axis", 1), call.attr("block_size", 0)
    values = x.to(scale.dtype) if x.dtype != scale.dtype else x
    if zero_point is not None:
        values = values - _along(zero_point, x, axis, block_size).to(scale.dtype)
    return values * _along(scale, x, axis, block_size)


@OPS.op("DynamicQuantizeLinear")
def _dynamic_quantize(call: OpCall, x):
    # onnxruntime's uint8 range of [min(x, 0), max(x, 0)]; the scale and zero point follow the data and are
    # not trained through.
    low = torch.clamp(x.detach().min(), max=0)
    high = torch.clamp(x.detach().max(), min=0)
    scale = (high - low) / 255
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-low / safe), 0, 255)
    codes = torch.clamp(rounded_straight_through(x / safe) + zero_point, 0, 255)
    return codes, scale, zero_point.to(torch.uint8)


def _unpacked(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of each row of bytes, two 4-bit codes a byte with the first in the low nibble."""
    if bits == 8:
        return packed
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return nibbles.reshape(*packed.shape[:-1], -1)


def _matmul_nbits_refusal(call: OpCall) -> str | None:
    if call.attr("bits", 4) not in (4, 8):
        return f"MatMulNBits with bits={call.attr('bits')} is not implemented (4 and 8 are)"
    if len(call.given_inputs) > 4 and call.given_inputs[4]:
        return "MatMulNBits with g_idx is not implemented"
    return None


@OPS.op("MatMulNBits", domain=CONTRIB_DOMAIN, fixed_inputs=(3, 4), refuse=_matmul_nbits_refusal)
def _matmul_nbits(call: OpCall, a, weight, scales, zero_points=None, g_idx=None, bias=None):
    """`weight`: the packed bytes, or their codes unpacked as floats (one a code, padding included)."""
    k, n, bits, block = call.attr("K"), call.attr("N"), call.attr("bits", 4), call.attr("block_size")
    blocks = math.ceil(k / block)
    rows = weight.reshape(n, -1)
    codes = rows if rows.is_floating_point() else _unpacked(rows, bits)
    codes = codes[:, : blocks * block].reshape(n, blocks, block)
    scale = scales.reshape(n, blocks)
    if zero_points is None:  # unsigned codes centred on the middle of their range
        zero = torch.full_like(scale, 2 ** (bits - 1))
    elif zero_points.dtype == torch.uint8:  # packed like the codes, each row to whole bytes
        zero = _unpacked(zero_points.reshape(n, -1), bits)[:, :blocks].to(scale.dtype)
    else:
        zero = zero_points.reshape(n, blocks)
    weight = (codes.to(scale.dtype) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    y = torch.matmul(a, weight.reshape(n, blocks * block)[:, :k].t().to(a.dtype))
    return y if bias is None else y + bias


def _gather_block_quantized_refusal(call: OpCall) -> str | None:
    data_type = call.input_type(0)
    if data_type == T.INT4 or (data_type == T.UINT4 and len(call.given_inputs) > 3 and call.given_inputs[3]):
        return None
    return "GatherBlockQuantized is implemented for INT4 codes, or UINT4 codes with zero points"


@OPS.op(
    "GatherBlockQuantized", domain=CONTRIB_DOMAIN, fixed_inputs=(0, 2, 3), refuse=_gather_block_quantized_refusal
)
def _gather_block_quantized(call: OpCall, data, indices, scales, zero_points=None):
    quantize_axis = normalized_axis(call.attr("quantize_axis", 1), data.dim())
    gather_axis = normalized_axis(call.attr("gather_axis", 0), data.dim())
    block = call.attr("block_size", 128)
    values = data.to(scales.dtype)
    if zero_points is not None:
        values = values - _along(zero_points, data, quantize_axis, block).to(scales.dtype)
    table = values * _along(scales, data, quantize_axis, block)
    positions = torch.where(indices < 0, indices + table.shape[gather_axis], indices).long()
    picked = table.index_select(gather_axis, positions.reshape(-1))
    return picked.reshape((*table.shape[:gather_axis], *positions.shape, *table.shape[gather_axis + 1 :]))
