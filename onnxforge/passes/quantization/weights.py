"""Quantizing a constant weight to int8 or int4 codes: round-to-nearest, error-minimizing search, and GPTQ.

Also the two encodings the graph needs: onnxruntime's MatMulNBits inputs and ONNX INT4/UINT4 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from onnxforge.errors import PassError
from onnxforge.passes.quantization.ranges import code_range, scale_and_zero_point

# method="search" tries clipping the range to each of these fractions of its extremes.
_SEARCH_RATIOS = np.linspace(1.0, 0.5, 21)
# method="search" evaluates this many weight elements at a time, so that its temporaries stay in cache.
_SEARCH_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bits (8 or 4), signed codes, symmetric range, and granularity."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Literal["per-tensor", "per-channel", "block"] = "per-channel"
    block_size: int = 0  # > 0 only for granularity="block" (32, 64, 128, ...; any power of two >= 16)
    seven_bit: bool = False  # signed int8 codes kept to 7 bits, for int8 kernels that overflow (ranges.code_range)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise PassError(f"quantization bits must be 4 or 8, not {self.bits}")
        if self.granularity not in ("per-tensor", "per-channel", "block"):
            raise PassError(f"granularity must be per-tensor, per-channel or block, not {self.granularity!r}")
        if self.granularity == "block":
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise PassError(f"block_size must be a power of two >= 16 (32, 64, 128...), not {self.block_size}")
        elif self.block_size:
            raise PassError(f"block_size is only for granularity='block', not {self.granularity!r}")

    @property
    def code_dtype(self) -> type[np.integer]:
        """The numpy type that holds one code: int8 or uint8 (int4 codes too, one per element)."""
        return np.int8 if self.signed else np.uint8

    def scale_and_zero_point(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-group scales (float32) and zero points (the code type) for per-group ranges [low, high]."""
        scale, zero_point = scale_and_zero_point(low, high, self.bits, self.signed, self.symmetric, self.seven_bit)
        return np.asarray(scale, dtype=np.float32), np.asarray(zero_point).astype(self.code_dtype)

    def quantize(self, values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """The codes of `values` (float) on the grid of `scale` and `zero_point` (broadcast against them)."""
        low, high = code_range(self.bits, self.signed, self.symmetric, self.seven_bit)
        return np.clip(np.rint(values / scale) + zero_point, low, high).astype(self.code_dtype)


@dataclass
class QuantizedWeight:
    """A weight as integer codes with scales and zero points, in the layout ONNX DequantizeLinear reads."""

    codes: np.ndarray  # same shape as the weight; int8 for signed, uint8 for unsigned; int4 in [-8, 7] or [0, 15]
    scale: np.ndarray  # float32; per-tensor (), per-channel (C,), block: the weight's rank, blocked axis ceil(D/B)
    zero_point: np.ndarray  # same shape as scale, same dtype as codes (all zeros when symmetric and signed)
    spec: QuantSpec
    axis: int | None  # per-channel: the channel axis; block: the blocked axis; per-tensor: None

    def broadcast(self, per_group: np.ndarray) -> np.ndarray:
        """Expand a per-channel or per-block array (scale or zero point) to the weight's shape."""
        if self.axis is None:
            return np.broadcast_to(per_group, self.codes.shape)
        if self.spec.granularity == "block":
            dim = self.codes.shape[self.axis]
            expanded = np.repeat(per_group, self.spec.block_size, axis=self.axis)
            return np.take(expanded, np.arange(dim), axis=self.axis)
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        return np.broadcast_to(per_group.reshape(shape), self.codes.shape)

    def dequantize(self) -> np.ndarray:
        """The float32 weight the codes stand for: (codes - zero_point) * scale."""
        shifted = self.codes.astype(np.float32) - self.broadcast(self.zero_point).astype(np.float32)
        return shifted * self.broadcast(self.scale)


@dataclass(frozen=True)
class _Groups:
    """How a weight splits into groups that share one scale: rows of a [groups, elements] matrix.

    Per channel, the channel axis moves first and each channel is a row; in blocks, the blocked axis moves
    last, is padded with zeros to whole blocks, and each block is a row.
    """

    shape: tuple[int, ...]
    spec: QuantSpec
    axis: int | None

    @property
    def _blocked(self) -> bool:
        return self.spec.granularity == "block"

    @property
    def _moved_shape(self) -> tuple[int, ...]:
        """The weight's shape with the grouping axis moved first (per channel) or last (blocks)."""
        others = tuple(size for position, size in enumerate(self.shape) if position != self.axis)
        return (*others, self.shape[self.axis]) if self._blocked else (self.shape[self.axis], *others)

    def split(self, array: np.ndarray) -> np.ndarray:
        """The [groups, elements] matrix of an array of the weight's shape."""
        if self.axis is None:
            return array.reshape(1, -1)
        if not self._blocked:
            return np.moveaxis(array, self.axis, 0).reshape(self.shape[self.axis], -1)
        moved = np.moveaxis(array, self.axis, -1)
        padding = -moved.shape[-1] % self.spec.block_size
        padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, padding)])
        return padded.reshape(-1, self.spec.block_size)

    def join(self, groups: np.ndarray) -> np.ndarray:
        """The inverse of `split`: back to the weight's shape, padding dropped."""
        if self.axis is None:
            return groups.reshape(self.shape)
        if not self._blocked:
            return np.moveaxis(groups.reshape(self._moved_shape), 0, self.axis)
        moved = groups.reshape(*self._moved_shape[:-1], -1)[..., : self.shape[self.axis]]
        return np.moveaxis(moved, -1, self.axis)

    def parameter_layout(self, per_group: np.ndarray) -> np.ndarray:
        """One value per group (scale or zero point) in DequantizeLinear's layout."""
        if self.axis is None:
            return per_group.reshape(())
        if not self._blocked:
            return per_group
        return np.moveaxis(per_group.reshape(*self._moved_shape[:-1], -1), -1, self.axis)


def quantize_weight(
    weight: np.ndarray,
    spec: QuantSpec,
    axis: int,
    method: Literal["rtn", "search"] = "rtn",
    input_energy: np.ndarray | None = None,
) -> QuantizedWeight:
    """Quantize a constant weight per tensor, per channel along `axis`, or in blocks cut along `axis`.

    rtn rounds to the nearest code on each group's full range. search also tries clipping each group's range
    (to 1.0 down to 0.5 of its extremes) and keeps the grid with the lowest squared error of the dequantized
    weight, each element weighted by `input_energy` of its index along axis 0 when given (for a MatMul
    weight [K, N]: the mean squared activation of each input feature), so it is never worse than rtn.
    """
    weight = np.asarray(weight, dtype=np.float32)
    axis = None if spec.granularity == "per-tensor" else axis % weight.ndim
    groups = _Groups(weight.shape, spec, axis)
    values = groups.split(weight)
    if method == "rtn":
        scale, zero_point = spec.scale_and_zero_point(values.min(axis=1), values.max(axis=1))
    elif method == "search":
        energy = None
        if input_energy is not None:
            if np.shape(input_energy) != weight.shape[:1]:
                raise ValueError(f"input_energy needs one value per index of axis 0 ({weight.shape[0]})")
            per_input = np.asarray(input_energy, dtype=np.float32).reshape(-1, *[1] * (weight.ndim - 1))
            energy = groups.split(np.broadcast_to(per_input, weight.shape))
        scale, zero_point = _search_grid(values, energy, spec)
    else:
        raise PassError(f"weight quantization method must be 'rtn' or 'search', not {method!r}")
    codes = spec.quantize(values, scale[:, None], zero_point[:, None])
    return QuantizedWeight(
        codes=groups.join(codes),
        scale=groups.parameter_layout(scale),
        zero_point=groups.parameter_layout(zero_point),
        spec=spec,
        axis=axis,
    )


def _search_grid(values: np.ndarray, energy: np.ndarray | None, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per group (row of `values`), the clipped range whose grid gives the lowest (energy-weighted) error."""
    rows_per_chunk = max(1, _SEARCH_CHUNK_ELEMENTS // values.shape[1])
    scales, zero_points = [], []
    for start in range(0, values.shape[0], rows_per_chunk):
        chunk = values[start : start + rows_per_chunk]
        weights = None if energy is None else energy[start : start + rows_per_chunk]
        low, high = chunk.min(axis=1), chunk.max(axis=1)
        best_error = np.full(len(chunk), np.inf)
        best_scale, best_zero_point = spec.scale_and_zero_point(low, high)
        for ratio in _SEARCH_RATIOS:
            scale, zero_point = spec.scale_and_zero_point(low * ratio, high * ratio)
            codes = spec.quantize(chunk, scale[:, None], zero_point[:, None])
            residual = chunk - (codes.astype(np.float32) - zero_point[:, None]) * scale[:, None]
            squared = np.square(residual) if weights is None else weights * np.square(residual)
            error = squared.sum(axis=1, dtype=np.float64)
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best_scale = np.where(better, scale, best_scale)
            best_zero_point = np.where(better, zero_point, best_zero_point)
        scales.append(best_scale)
        zero_points.append(best_zero_point)
    return np.concatenate(scales), np.concatenate(zero_points)


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    spec: QuantSpec,
    damp: float = 0.01,
    block_columns: int = 128,
) -> QuantizedWeight:
    """Quantize a MatMul weight [K, N] with GPTQ (Frantar et al. 2022), given H = X^T X of its inputs X.

    Input rows k = 0..K-1 are quantized in order, and each row's rounding error is spread over the rows not
    yet quantized through the Cholesky factor of H^-1, so that X @ W changes as little as possible; updates
    to later rows are applied lazily, `block_columns` rows at a time. Blocks (granularity "block", along K)
    take their scales from the error-updated rows when the block starts; per-channel (over N) and per-tensor
    scales are fixed up front. Dead inputs (H[k, k] == 0) get a zero weight, as in GPTQ; `damp` times the
    mean diagonal is added to H to keep it invertible.
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[0], weight.shape[0]):
        shapes = f"{weight.shape} and {hessian.shape}"
        raise ValueError(f"gptq_quantize needs a weight [K, N] and a hessian [K, K], not {shapes}")
    rows, columns = weight.shape
    # float64: each row's update sums the errors of all the rows before it.
    w = weight.astype(np.float64)
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(rows)] += damp * np.mean(np.diag(h))
    inverse_factor = np.linalg.cholesky(np.linalg.inv(h)).T  # upper U with H^-1 = U^T U

    blocked = spec.granularity == "block"
    if blocked:
        # A lazy batch must hold whole blocks, so that a block's scale sees all the error it has received.
        block_columns = max(1, block_columns // spec.block_size) * spec.block_size
        scale = zero_point = None
        block_scales, block_zero_points = [], []
    else:
        fixed = quantize_weight(w.astype(np.float32), spec, axis=1)
        scale, zero_point = np.broadcast_to(fixed.scale, columns), np.broadcast_to(fixed.zero_point, columns)

    codes = np.empty(weight.shape, dtype=spec.code_dtype)
    for start in range(0, rows, block_columns):
        stop = min(start + block_columns, rows)
        # Within a batch a row receives the errors of the rows before it when it is reached: one product
        # instead of a rank-one update of all later rows per row, with the same result.
        batch, factor = w[start:stop], inverse_factor[start:stop, start:stop]
        errors = np.zeros_like(batch)
        for i in range(stop - start):
            if blocked and i % spec.block_size == 0:
                block = batch[i : i + spec.block_size] - factor[:i, i : i + spec.block_size].T @ errors[:i]
                scale, zero_point = spec.scale_and_zero_point(block.min(axis=0), block.max(axis=0))
                block_scales.append(scale)
                block_zero_points.append(zero_point)
            row = batch[i] - factor[:i, i] @ errors[:i]
            codes[start + i] = spec.quantize(row, scale, zero_point)
            dequantized = (codes[start + i].astype(np.float64) - zero_point) * scale
            errors[i] = (row - dequantized) / factor[i, i]
        w[stop:] -= inverse_factor[start:stop, stop:].T @ errors

    if blocked:
        return QuantizedWeight(codes, np.stack(block_scales), np.stack(block_zero_points), spec, axis=0)
    return QuantizedWeight(codes, fixed.scale, fixed.zero_point, spec, fixed.axis)


def pack_matmul_nbits(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The B, scales and zero_points inputs of onnxruntime's com.microsoft.MatMulNBits for a weight [K, N].

    The weight must be quantized in blocks along K (axis 0) with 4 or 8 bits. MatMulNBits reads unsigned
    codes, so signed ones are shifted by 2**(bits-1) with their zero points. B is uint8 [N, blocks,
    block_size * bits / 8] with codes along K, two 4-bit codes a byte low nibble first, a short last block
    padded with its zero point; scales are float32 [N * blocks]; zero points are uint8, packed like B for 4
    bits with each of the N rows padded to whole bytes.
    """
    spec = q.spec
    if spec.granularity != "block" or q.axis != 0 or q.codes.ndim != 2:
        raise ValueError("pack_matmul_nbits needs a weight [K, N] quantized in blocks along axis 0")
    offset = 2 ** (spec.bits - 1) if spec.signed else 0
    codes = (q.codes.astype(np.int16) + offset).astype(np.uint8).T  # [N, K]
    zero_points = (q.zero_point.astype(np.int16) + offset).astype(np.uint8).T  # [N, blocks]
    columns, rows = codes.shape
    blocks = zero_points.shape[1]
    padding = np.repeat(zero_points[:, -1:], blocks * spec.block_size - rows, axis=1)
    packed = _pack_low_first(np.concatenate([codes, padding], axis=1), spec.bits)
    packed_zero_points = _pack_low_first(zero_points, spec.bits)
    return (
        packed.reshape(columns, blocks, spec.block_size * spec.bits // 8),
        q.scale.T.astype(np.float32).reshape(-1),
        packed_zero_points.reshape(-1),
    )


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack each row of unsigned codes into bytes, two 4-bit codes a byte with the first in the low nibble."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = np.pad(codes, [(0, 0), (0, 1)])
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def int4_tensor(name: str, codes: np.ndarray, signed: bool) -> onnx.TensorProto:
    """An ONNX INT4 (signed) or UINT4 TensorProto (opset 21) holding 4-bit codes, packed two a byte.

    The bytes go in raw_data: onnx.helper.make_tensor would store each packed byte as an int32 varint (up to
    twice the size).
    """
    data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    flat = (np.asarray(codes).ravel().astype(np.int64) & 0xF).astype(np.uint8)
    packed = _pack_low_first(flat.reshape(1, -1), bits=4).ravel()
    return onnx.helper.make_tensor(name, data_type, codes.shape, packed.tobytes(), raw=True)
