"""Torch implementations of the standard ONNX ops (default domain), attributes and opset differences honoured.

Inference semantics throughout: Dropout is the identity and BatchNormalization uses its stored statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onnxforge.distill.op_table import OpCall, OpTable, ints, normalized_axis, scalar, torch_dtype

OPS = OpTable()

# --- elementwise --------------------------------------------------------------------------------------------

_UNARY = {
    "Abs": torch.abs,
    "Acos": torch.acos,
    "Asin": torch.asin,
    "Atan": torch.atan,
    "Ceil": torch.ceil,
    "Cos": torch.cos,
    "Cosh": torch.cosh,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Floor": torch.floor,
    "IsNaN": torch.isnan,
    "Log": torch.log,
    "Mish": F.mish,
    "Neg": torch.neg,
    "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal,
    "Relu": torch.relu,
    "Round": torch.round,  # half to even, as ONNX rounds
    "Sigmoid": torch.sigmoid,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Sinh": torch.sinh,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Sqrt": torch.sqrt,
    "Tan": torch.tan,
    "Tanh": torch.tanh,
}

for _op_type, _function in _UNARY.items():
    OPS.op(_op_type)(lambda call, x, f=_function: f(x))


def _integer(x: torch.Tensor) -> bool:
    return not (x.is_floating_point() or x.dtype == torch.bool)


@OPS.op("Add")
def _add(call: OpCall, a, b):
    return a + b


@OPS.op("Sub")
def _sub(call: OpCall, a, b):
    return a - b


@OPS.op("Mul")
def _mul(call: OpCall, a, b):
    return a * b


@OPS.op("Div")
def _div(call: OpCall, a, b):
    # Integer division truncates toward zero, as C does.
    return torch.div(a, b, rounding_mode="trunc") if _integer(a) else a / b


@OPS.op("Pow")
def _pow(call: OpCall, x, y):
    return torch.pow(x, y).to(x.dtype)


@OPS.op("Mod")
def _mod(call: OpCall, a, b):
    return torch.fmod(a, b) if call.attr("fmod", 0) else torch.remainder(a, b)


@OPS.op("Max")
def _max(call: OpCall, *xs):
    return functools.reduce(torch.maximum, xs)


@OPS.op("Min")
def _min(call: OpCall, *xs):
    return functools.reduce(torch.minimum, xs)


@OPS.op("Sum")
def _sum(call: OpCall, *xs):
    return functools.reduce(torch.add, xs)


@OPS.op("Mean")
def _mean(call: OpCall, *xs):
    return functools.reduce(torch.add, xs) / len(xs)


_COMPARISONS = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}

for _op_type, _function in _COMPARISONS.items():
    OPS.op(_op_type)(lambda call, a, b, f=_function: f(a, b))


@OPS.op("IsInf")
def _is_inf(call: OpCall, x):
    positive, negative = call.attr("detect_positive", 1), call.attr("detect_negative", 1)
    return (torch.isposinf(x) & bool(positive)) | (torch.isneginf(x) & bool(negative))


@OPS.op("Where")
def _where(call: OpCall, condition, x, y):
    return torch.where(condition.bool(), x, y)


@OPS.op("LeakyRelu")
def _leaky_relu(call: OpCall, x):
    return F.leaky_relu(x, call.attr("alpha", 0.01))


@OPS.op("PRelu")
def _prelu(call: OpCall, x, slope):
    return torch.where(x < 0, x * slope, x)


@OPS.op("Elu")
def _elu(call: OpCall, x):
    return F.elu(x, call.attr("alpha", 1.0))


@OPS.op("Celu")
def _celu(call: OpCall, x):
    return F.celu(x, call.attr("alpha", 1.0))


@OPS.op("Selu")
def _selu(call: OpCall, x):
    alpha, gamma = call.attr("alpha", 1.67326319217681884765625), call.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@OPS.op("ThresholdedRelu")
def _thresholded_relu(call: OpCall, x):
    return torch.where(x > call.attr("alpha", 1.0), x, torch.zeros_like(x))


@OPS.op("HardSigmoid")
def _hard_sigmoid(call: OpCall, x):
    return torch.clamp(call.attr("alpha", 0.2) * x + call.attr("beta", 0.5), 0, 1)


@OPS.op("HardSwish")
def _hard_swish(call: OpCall, x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


@OPS.op("Swish")
def _swish(call: OpCall, x):
    return x * torch.sigmoid(call.attr("alpha", 1.0) * x)


@OPS.op("Gelu")
def _gelu(call: OpCall, x):
    return F.gelu(x, approximate=call.attr("approximate", "none"))


@OPS.op("Clip")
def _clip(call: OpCall, x, low=None, high=None):
    if call.opset < 11:  # the bounds were attributes
        low, high = call.attr("min"), call.attr("max")
    else:
        low = None if low is None else scalar(low)
        high = None if high is None else scalar(high)
    if low is None and high is None:
        return x
    return torch.clamp(x, low, high)


def _softmax_axis(call: OpCall, x: torch.Tensor) -> int:
    return normalized_axis(call.attr("axis", -1 if call.opset >= 13 else 1), x.dim())


def _softmax_like(function):
    def run(call: OpCall, x):
        axis = _softmax_axis(call, x)
        if call.opset >= 13:
            return function(x, dim=axis)
        # Before opset 13 the input is flattened to [prod(shape[:axis]), prod(shape[axis:])] first.
        return function(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)

    return run


OPS.op("Softmax")(_softmax_like(torch.softmax))
OPS.op("LogSoftmax")(_softmax_like(torch.log_softmax))


# --- linear algebra ------------------------------------------------------------------------------------------


@OPS.op("MatMul")
def _matmul(call: OpCall, a, b):
    return torch.matmul(a, b)


@OPS.op("Gemm")
def _gemm(call: OpCall, a, b, c=None):
    a = a.t() if call.attr("transA", 0) else a
    b = b.t() if call.attr("transB", 0) else b
    y = a @ b
    alpha, beta = call.attr("alpha", 1.0), call.attr("beta", 1.0)
    y = y * alpha if alpha != 1.0 else y
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@OPS.op("Einsum")
def _einsum(call: OpCall, *xs):
    return torch.einsum(call.attr("equation").replace(" ", ""), *xs)


# --- convolution and pooling ---------------------------------------------------------------------------------


def spatial_pads(call: OpCall, sizes: Sequence[int], kernel: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding of each spatial axis from `pads` or `auto_pad` (SAME_UPPER puts the odd one at the
    end, SAME_LOWER at the beginning), for a window of `kernel` (dilated) elements."""
    auto_pad = call.attr("auto_pad", "NOTSET")
    rank = len(sizes)
    if auto_pad == "VALID":
        return [(0, 0)] * rank
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        strides = call.attr("strides") or [1] * rank
        pads = []
        for size, window, stride in zip(sizes, kernel, strides):
            total = max((math.ceil(size / stride) - 1) * stride + window - size, 0)
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return pads
    pads = call.attr("pads") or [0] * (2 * rank)
    return list(zip(pads[:rank], pads[rank:]))


def torch_pad_list(pads: Sequence[tuple[int, int]]) -> list[int]:
    """F.pad's argument for (begin, end) pads of the trailing axes: the last axis first."""
    return [amount for begin_end in reversed(pads) for amount in begin_end]


def _dilated(kernel: Sequence[int], dilations: Sequence[int]) -> list[int]:
    return [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]


_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def convolution(call: OpCall, x, w, b=None):
    """Conv with the node's groups, strides, dilations and padding (asymmetric padding applied beforehand)."""
    rank = x.dim() - 2
    kernel = call.attr("kernel_shape") or list(w.shape[2:])
    dilations = call.attr("dilations") or [1] * rank
    strides = call.attr("strides") or [1] * rank
    pads = spatial_pads(call, x.shape[2:], _dilated(kernel, dilations))
    padding: list[int] | int = [begin for begin, _ in pads]
    if any(begin != end for begin, end in pads):
        x, padding = F.pad(x, torch_pad_list(pads)), 0
    return _CONVOLUTIONS[rank](x, w, b, strides, padding, dilations, call.attr("group", 1))


OPS.op("Conv")(convolution)


@OPS.op("ConvTranspose")
def _conv_transpose(call: OpCall, x, w, b=None):
    rank = x.dim() - 2
    kernel = call.attr("kernel_shape") or list(w.shape[2:])
    dilations = call.attr("dilations") or [1] * rank
    strides = call.attr("strides") or [1] * rank
    output_padding = call.attr("output_padding") or [0] * rank
    # The full transposed convolution, then extra rows for output_padding, then the pads cropped.
    y = _TRANSPOSED[rank](x, w, None, strides, 0, 0, call.attr("group", 1), dilations)
    full = [
        (size - 1) * stride + window + extra
        for size, stride, window, extra in zip(x.shape[2:], strides, _dilated(kernel, dilations), output_padding)
    ]
    y = F.pad(y, torch_pad_list([(0, extra) for extra in output_padding]))
    auto_pad, output_shape = call.attr("auto_pad", "NOTSET"), call.attr("output_shape")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = list(output_shape)[-rank:] if output_shape else [s * st for s, st in zip(x.shape[2:], strides)]
        totals = [f - o for f, o in zip(full, wanted)]
        upper = auto_pad == "SAME_UPPER"
        pads = [(t // 2, t - t // 2) if upper else (t - t // 2, t // 2) for t in totals]
    elif auto_pad == "VALID":
        pads = [(0, 0)] * rank
    else:
        flat = call.attr("pads") or [0] * (2 * rank)
        pads = list(zip(flat[:rank], flat[rank:]))
    y = y[(slice(None), slice(None), *(slice(begin, size - end) for (begin, end), size in zip(pads, full)))]
    if b is not None:
        y = y + b.reshape(1, -1, *[1] * rank)
    return y


def _pool_geometry(call: OpCall, x):
    rank = x.dim() - 2
    kernel = call.attr("kernel_shape")
    strides = call.attr("strides") or [1] * rank
    dilations = call.attr("dilations") or [1] * rank
    pads = spatial_pads(call, x.shape[2:], _dilated(kernel, dilations))
    # torch pads symmetrically, by at most half the window: other padding is applied to the input first.
    native = all(begin == end and begin <= w // 2 for (begin, end), w in zip(pads, _dilated(kernel, dilations)))
    return rank, kernel, strides, dilations, pads, native


def _max_pool_refusal(call: OpCall) -> str | None:
    if len(call.used_outputs) > 1 and call.used_outputs[1]:
        return "MaxPool's Indices output is not implemented"
    return None


@OPS.op("MaxPool", refuse=_max_pool_refusal)
def _max_pool(call: OpCall, x):
    rank, kernel, strides, dilations, pads, native = _pool_geometry(call, x)
    padding: list[int] | int = [begin for begin, _ in pads]
    if not native:
        x, padding = F.pad(x, torch_pad_list(pads), value=-math.inf), 0
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
    return pool(x, kernel, strides, padding, dilations, ceil_mode=bool(call.attr("ceil_mode", 0)))


def _average_pool_refusal(call: OpCall) -> str | None:
    if any(d != 1 for d in call.attr("dilations") or []):
        return "AveragePool with dilations is not implemented"
    return None


@OPS.op("AveragePool", refuse=_average_pool_refusal)
def _average_pool(call: OpCall, x):
    rank, kernel, strides, _, pads, native = _pool_geometry(call, x)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    ceil_mode, include_pad = bool(call.attr("ceil_mode", 0)), bool(call.attr("count_include_pad", 0))
    if native:
        padding = [begin for begin, _ in pads]
        return pool(x, kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=include_pad)
    # Sums over the windows of the padded input, divided by how many elements each window counts.
    flat = torch_pad_list(pads)
    options = {"ceil_mode": ceil_mode}
    if rank > 1:
        options["divisor_override"] = 1
    sums = pool(F.pad(x, flat), kernel, strides, 0, **options)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    counts = pool(F.pad(ones, flat, value=1.0 if include_pad else 0.0), kernel, strides, 0, **options)
    return sums / counts  # avg_pool1d has no divisor_override: there both are means, with the same ratio


@OPS.op("GlobalAveragePool")
def _global_average_pool(call: OpCall, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@OPS.op("GlobalMaxPool")
def _global_max_pool(call: OpCall, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# --- normalization -------------------------------------------------------------------------------------------


def _batch_norm_refusal(call: OpCall) -> str | None:
    if call.attr("training_mode", 0) or any(call.used_outputs[1:]):
        return "BatchNormalization in training mode (running statistics as outputs) is not implemented"
    return None


@OPS.op("BatchNormalization", fixed_inputs=(3, 4), refuse=_batch_norm_refusal)
def _batch_norm(call: OpCall, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=call.attr("epsilon", 1e-5))


@OPS.op("InstanceNormalization")
def _instance_norm(call: OpCall, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=call.attr("epsilon", 1e-5))


@OPS.op("GroupNormalization")
def _group_norm(call: OpCall, x, scale, bias):
    groups = call.attr("num_groups")
    if call.opset < 21:  # one scale and bias per group, not per channel
        repeat = x.shape[1] // groups
        scale, bias = scale.repeat_interleave(repeat), bias.repeat_interleave(repeat)
    return F.group_norm(x, groups, scale, bias, call.attr("epsilon", 1e-5))


def normalized(x: torch.Tensor, axis: int, epsilon: float, centered: bool = True):
    """x normalized over the axes from `axis` on (centered: minus the mean, else RMS), with its mean and inverse
    standard deviation (kept dims); half-precision input is normalized in float32."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    axes = tuple(range(normalized_axis(axis, x.dim()), x.dim()))
    mean = work.mean(dim=axes, keepdim=True) if centered else None
    centered_x = work - mean if centered else work
    inverse_std = torch.rsqrt(centered_x.pow(2).mean(dim=axes, keepdim=True) + epsilon)
    return (centered_x * inverse_std).to(x.dtype), mean, inverse_std


@OPS.op("LayerNormalization")
@OPS.op("LayerNormalization", domain="com.microsoft")
def _layer_norm(call: OpCall, x, scale, bias=None):
    y, mean, inverse_std = normalized(x, call.attr("axis", -1), call.attr("epsilon", 1e-5))
    y = y * scale if bias is None else y * scale + bias
    return y, mean, inverse_std


@OPS.op("SimplifiedLayerNormalization")  # onnxruntime registers its RMSNorm in the default domain
@OPS.op("RMSNormalization")
def _rms_norm(call: OpCall, x, scale):
    y, _, inverse_std = normalized(x, call.attr("axis", -1), call.attr("epsilon", 1e-5), centered=False)
    return y * scale, inverse_std


# --- attention -----------------------------------------------------------------------------------------------


def _attention_refusal(call: OpCall) -> str | None:
    given = call.given_inputs
    if any(given[4:]) or any(call.used_outputs[1:]):
        return "Attention with past key/values or with present or QK outputs is not implemented"
    if call.attr("q_num_heads") or call.attr("kv_num_heads") or call.attr("softcap", 0.0):
        return "Attention on 3-D inputs (q_num_heads, kv_num_heads) or with softcap is not implemented"
    return None


@OPS.op("Attention", fixed_inputs=(3,), refuse=_attention_refusal)
def _attention(call: OpCall, q, k, v, mask=None):
    """The standard op (opset 23) on 4-D heads [batch, heads, length, size]; a boolean mask says which keys
    take part, a float one is added to the scores."""
    if call.attr("is_causal", 0):
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.masked_fill(~causal, -math.inf)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=call.attr("scale"))


# --- tensor layout -------------------------------------------------------------------------------------------


def _cast_refusal(call: OpCall) -> str | None:
    if torch_dtype(call.attr("to")) is None:
        return f"Cast to ONNX element type {call.attr('to')} has no torch dtype"
    return None


@OPS.op("Cast", refuse=_cast_refusal)
def _cast(call: OpCall, x):
    return x.to(torch_dtype(call.attr("to")))


@OPS.op("CastLike")
def _cast_like(call: OpCall, x, like):
    return x.to(like.dtype)


@OPS.op("Identity")
def _identity(call: OpCall, x):
    return x


@OPS.op("Dropout")
def _dropout(call: OpCall, x, *_):
    return x, torch.ones_like(x, dtype=torch.bool)


@OPS.op("Reshape", fixed_inputs=(1,))
def _reshape(call: OpCall, x, shape):
    target = ints(shape)
    if not call.attr("allowzero", 0):  # 0 copies the input's dimension
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@OPS.op("Transpose")
def _transpose(call: OpCall, x):
    return x.permute(call.attr("perm") or list(reversed(range(x.dim()))))


@OPS.op("Concat")
def _concat(call: OpCall, *xs):
    return torch.cat(xs, dim=call.attr("axis"))


@OPS.op("Split", fixed_inputs=(1,))
def _split(call: OpCall, x, split=None):
    axis = normalized_axis(call.attr("axis", 0), x.dim())
    size = x.shape[axis]
    sizes = ints(split) if split is not None else list(call.attr("split") or [])
    if not sizes:
        count = call.attr("num_outputs") or len(call.used_outputs)
        chunk = math.ceil(size / count)  # num_outputs: equal parts, the last one smaller
        sizes = [min(chunk, size - i * chunk) for i in range(count)]
    return torch.split(x, sizes, dim=axis)


def _slice_positions(size: int, start: int, end: int, step: int) -> tuple[int, int]:
    """ONNX Slice's start and end for one axis, negatives counted from the end and clamped as the op clamps."""
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size)
    return min(max(start, 0), size - 1), min(max(end, -1), size - 1)


@OPS.op("Slice", fixed_inputs=(1, 2, 3, 4))
def _slice(call: OpCall, x, starts=None, ends=None, axes=None, steps=None):
    if call.opset < 10:
        starts_list, ends_list, axes_list = call.attr("starts"), call.attr("ends"), call.attr("axes")
        steps_list = []
    else:
        starts_list, ends_list, axes_list, steps_list = ints(starts), ints(ends), ints(axes), ints(steps)
    axes_list = list(axes_list or range(len(starts_list)))
    steps_list = steps_list or [1] * len(starts_list)
    for axis, start, end, step in zip(axes_list, starts_list, ends_list, steps_list):
        axis = normalized_axis(axis, x.dim())
        begin, stop = _slice_positions(x.shape[axis], start, end, step)
        if step > 0:
            x = x[(slice(None),) * axis + (slice(begin, stop, step),)]
        else:  # torch slices with positive steps only
            positions = torch.arange(begin, stop, step, device=x.device)
            x = x.index_select(axis, positions)
    return x


def _positive_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


@OPS.op("Gather", fixed_inputs=(1,))
def _gather(call: OpCall, data, indices):
    axis = normalized_axis(call.attr("axis", 0), data.dim())
    positions = _positive_indices(indices, data.shape[axis])
    picked = data.index_select(axis, positions.reshape(-1))
    return picked.reshape((*data.shape[:axis], *positions.shape, *data.shape[axis + 1 :]))


@OPS.op("GatherElements", fixed_inputs=(1,))
def _gather_elements(call: OpCall, data, indices):
    axis = normalized_axis(call.attr("axis", 0), data.dim())
    return torch.gather(data, axis, _positive_indices(indices, data.shape[axis]))


def _gather_nd_refusal(call: OpCall) -> str | None:
    return "GatherND with batch_dims is not implemented" if call.attr("batch_dims", 0) else None


@OPS.op("GatherND", fixed_inputs=(1,), refuse=_gather_nd_refusal)
def _gather_nd(call: OpCall, data, indices):
    depth = indices.shape[-1]
    positions = [_positive_indices(indices[..., i], data.shape[i]) for i in range(depth)]
    return data[tuple(positions)]


def _scatter_refusal(call: OpCall) -> str | None:
    if call.attr("reduction", "none") not in ("none", "add", "mul"):
        return f"{call.op} with reduction={call.attr('reduction')} is not implemented"
    return None


@OPS.op("ScatterND", fixed_inputs=(1,), refuse=_scatter_refusal)
def _scatter_nd(call: OpCall, data, indices, updates):
    depth = indices.shape[-1]
    positions = tuple(_positive_indices(indices[..., i], data.shape[i]) for i in range(depth))
    reduction = call.attr("reduction", "none")
    if reduction == "none":
        return data.index_put(positions, updates)
    if reduction == "add":
        return data.index_put(positions, updates, accumulate=True)
    result = data.clone()
    result[positions] = result[positions] * updates
    return result


@OPS.op("ScatterElements", fixed_inputs=(1,), refuse=_scatter_refusal)
def _scatter_elements(call: OpCall, data, indices, updates):
    axis = normalized_axis(call.attr("axis", 0), data.dim())
    positions = _positive_indices(indices, data.shape[axis])
    reduction = call.attr("reduction", "none")
    if reduction == "none":
        return data.scatter(axis, positions, updates)
    return data.scatter_reduce(axis, positions, updates, reduce="sum" if reduction == "add" else "prod")


def _axes(call: OpCall, axes: torch.Tensor | None) -> list[int]:
    """Axes given as an input (newer opsets) or as the `axes` attribute (older ones)."""
    return ints(axes) if axes is not None else list(call.attr("axes") or [])


@OPS.op("Unsqueeze", fixed_inputs=(1,))
def _unsqueeze(call: OpCall, x, axes=None):
    rank = x.dim() + len(_axes(call, axes))
    for axis in sorted(normalized_axis(a, rank) for a in _axes(call, axes)):
        x = x.unsqueeze(axis)
    return x


@OPS.op("Squeeze", fixed_inputs=(1,))
def _squeeze(call: OpCall, x, axes=None):
    listed = _axes(call, axes)
    if not listed:
        return x.reshape([d for d in x.shape if d != 1])
    return x.squeeze(tuple(normalized_axis(a, x.dim()) for a in listed))


@OPS.op("Flatten")
def _flatten(call: OpCall, x):
    axis = normalized_axis(call.attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@OPS.op("Shape")
def _shape(call: OpCall, x):
    rank = x.dim()
    start, end = call.attr("start", 0), call.attr("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return torch.tensor(list(x.shape[start:end]), dtype=torch.int64, device=x.device)


@OPS.op("Size")
def _size(call: OpCall, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@OPS.op("Expand", fixed_inputs=(1,))
def _expand(call: OpCall, x, shape):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape))))


@OPS.op("Tile", fixed_inputs=(1,))
def _tile(call: OpCall, x, repeats):
    return x.repeat(ints(repeats))


@OPS.op("ConstantOfShape", fixed_inputs=(0,))
def _constant_of_shape(call: OpCall, shape):
    value = call.attr("value")
    fill = torch.from_numpy(np.zeros(1, np.float32) if value is None else np.array(value).reshape(-1))
    return torch.full(ints(shape), fill.item(), dtype=fill.dtype, device=shape.device)


@OPS.op("Range", fixed_inputs=(0, 1, 2))
def _range(call: OpCall, start, limit, delta):
    return torch.arange(scalar(start), scalar(limit), scalar(delta), dtype=start.dtype, device=start.device)


@OPS.op("Trilu", fixed_inputs=(1,))
def _trilu(call: OpCall, x, k=None):
    diagonal = int(scalar(k)) if k is not None else 0
    return torch.triu(x, diagonal) if call.attr("upper", 1) else torch.tril(x, diagonal)


@OPS.op("CumSum", fixed_inputs=(1,))
def _cumsum(call: OpCall, x, axis):
    dim = normalized_axis(int(scalar(axis)), x.dim())
    reverse = call.attr("reverse", 0)
    if reverse:
        x = x.flip(dim)
    total = torch.cumsum(x, dim).to(x.dtype)
    if call.attr("exclusive", 0):  # shifted by one: each sum leaves its own element out
        total = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), total.narrow(dim, 0, x.shape[dim] - 1)], dim)
    return total.flip(dim) if reverse else total


@OPS.op("DepthToSpace")
def _depth_to_space(call: OpCall, x):
    b, c, h, w = x.shape
    size = call.attr("blocksize")
    if call.attr("mode", "DCR") == "DCR":
        y = x.reshape(b, size, size, c // size**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // size**2, size, size, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // size**2, h * size, w * size)


@OPS.op("SpaceToDepth")
def _space_to_depth(call: OpCall, x):
    b, c, h, w = x.shape
    size = call.attr("blocksize")
    y = x.reshape(b, c, h // size, size, w // size, size).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * size**2, h // size, w // size)


@OPS.op("NonZero")
def _non_zero(call: OpCall, x):
    return torch.nonzero(x).t()


# --- padding and resizing ------------------------------------------------------------------------------------


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@OPS.op("Pad", fixed_inputs=(1, 2, 3))
def _pad(call: OpCall, x, pads=None, value=None, axes=None):
    if call.opset < 11:
        flat, fill = list(call.attr("pads")), call.attr("value", 0.0)
    else:
        flat, fill = ints(pads), 0 if value is None else scalar(value)
    listed = [normalized_axis(a, x.dim()) for a in ints(axes)] if axes is not None else list(range(x.dim()))
    per_axis = [(0, 0)] * x.dim()
    for i, axis in enumerate(listed):
        per_axis[axis] = (flat[i], flat[i + len(listed)])
    mode = _PAD_MODES[call.attr("mode", "constant")]
    first = next((i for i, p in enumerate(per_axis) if p != (0, 0)), x.dim())
    if first == x.dim():
        return x
    if mode == "constant":
        return F.pad(x, torch_pad_list(per_axis[first:]), value=fill)
    # torch pads the last 1-3 axes of a batch of channels: fold the leading axes into that batch.
    padded = x.dim() - first
    shape = x.shape
    lead = x.reshape(-1, *shape[first:]).unsqueeze(0) if first > 0 else x.unsqueeze(0).unsqueeze(0)
    y = F.pad(lead, torch_pad_list(per_axis[first:]), mode=mode)
    return y.reshape(*shape[:first], *y.shape[-padded:])


def _resize_refusal(call: OpCall) -> str | None:
    mode = call.attr("mode", "nearest")
    transform = call.attr("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        return f"Resize mode {mode!r} is not implemented (nearest and linear are)"
    if transform == "tf_crop_and_resize":
        return "Resize with coordinate_transformation_mode 'tf_crop_and_resize' is not implemented"
    if call.attr("antialias", 0):
        return "Resize with antialias is not implemented"
    return None


def _source_positions(transform: str, out: int, size: int, scale: float, device) -> torch.Tensor:
    """Where each output position of one axis samples the input (float32, as onnxruntime computes them)."""
    x = torch.arange(out, dtype=torch.float32, device=device)
    if transform == "asymmetric":
        return x / scale
    if transform == "align_corners":
        return torch.zeros_like(x) if out == 1 else x * ((size - 1) / (out - 1))
    if transform == "pytorch_half_pixel" and out == 1:
        return torch.zeros_like(x)
    if transform == "half_pixel_symmetric":
        offset = size / 2 * (1 - out / (scale * size))
        return offset + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel, pytorch_half_pixel


def _nearest(positions: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "floor":
        return torch.floor(positions)
    if mode == "ceil":
        return torch.ceil(positions)
    if mode == "round_prefer_ceil":
        return torch.floor(positions + 0.5)
    return torch.ceil(positions - 0.5)  # round_prefer_floor


def resized(x, scales: list[float], sizes: list[int], mode: str, transform: str, nearest_mode: str):
    """x resized axis by axis (nearest or linear, which is separable) to `sizes` with the given scales."""
    for axis, (scale, out) in enumerate(zip(scales, sizes)):
        size = x.shape[axis]
        if out == size and scale == 1.0:
            continue
        positions = _source_positions(transform, out, size, scale, x.device)
        if mode == "nearest":
            index = _nearest(positions, nearest_mode).clamp(0, size - 1).long()
            x = x.index_select(axis, index)
            continue
        positions = positions.clamp(0, size - 1)
        low = positions.floor().long()
        high = (low + 1).clamp(max=size - 1)
        weight = (positions - low).to(x.dtype).reshape(-1, *[1] * (x.dim() - axis - 1))
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return x


@OPS.op("Resize", fixed_inputs=(1, 2, 3), refuse=_resize_refusal)
def _resize(call: OpCall, x, roi=None, scales=None, sizes=None):
    if call.opset < 11:  # Resize-10 takes (X, scales) and samples asymmetrically
        scales, roi = roi, None
        transform, nearest_mode = "asymmetric", "floor"
    else:
        transform = call.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = call.attr("nearest_mode", "round_prefer_floor")
    rank = x.dim()
    axes = [normalized_axis(a, rank) for a in (call.attr("axes") or range(rank))]
    scale_list, size_list = [1.0] * rank, list(x.shape)
    given_sizes = ints(sizes) if sizes is not None and sizes.numel() else []
    if given_sizes:
        policy = call.attr("keep_aspect_ratio_policy", "stretch")
        ratios = [given_sizes[i] / x.shape[a] for i, a in enumerate(axes)]
        if policy != "stretch":
            ratio = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [ratio] * len(axes)
            given_sizes = [int(round(ratio * x.shape[a])) for a in axes]
        for i, axis in enumerate(axes):
            scale_list[axis], size_list[axis] = ratios[i], given_sizes[i]
    else:
        for i, axis in enumerate(axes):
            scale = float(scales.reshape(-1)[i].item())
            scale_list[axis], size_list[axis] = scale, int(math.floor(x.shape[axis] * scale))
    return resized(x, scale_list, size_list, call.attr("mode", "nearest"), transform, nearest_mode)


def _upsample_refusal(call: OpCall) -> str | None:
    mode = call.attr("mode", "nearest")
    return None if mode in ("nearest", "linear") else f"Upsample mode {mode!r} is not implemented"


@OPS.op("Upsample", fixed_inputs=(1,), refuse=_upsample_refusal)
def _upsample(call: OpCall, x, scales=None):
    listed = [float(s) for s in scales.reshape(-1).tolist()] if scales is not None else list(call.attr("scales"))
    sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, listed)]
    return resized(x, listed, sizes, call.attr("mode", "nearest"), "asymmetric", "floor")


# --- reductions ----------------------------------------------------------------------------------------------


def _reduction(function):
    def run(call: OpCall, x, axes=None):
        listed = _axes(call, axes)
        if not listed and call.attr("noop_with_empty_axes", 0):
            return x
        dims = tuple(normalized_axis(a, x.dim()) for a in listed) or tuple(range(x.dim()))
        return function(x, dims, bool(call.attr("keepdims", 1)))

    return run


def _product(x, dims, keep):
    for dim in sorted(dims, reverse=True):
        x = x.prod(dim, keepdim=keep)
    return x


_REDUCTIONS = {
    "ReduceMean": lambda x, dims, keep: x.mean(dims, keepdim=keep),
    "ReduceSum": lambda x, dims, keep: x.sum(dims, keepdim=keep).to(x.dtype),
    "ReduceMax": lambda x, dims, keep: x.amax(dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: x.amin(dims, keepdim=keep),
    "ReduceProd": _product,
    "ReduceL1": lambda x, dims, keep: x.abs().sum(dims, keepdim=keep),
    "ReduceL2": lambda x, dims, keep: x.pow(2).sum(dims, keepdim=keep).sqrt(),
    "ReduceSumSquare": lambda x, dims, keep: x.pow(2).sum(dims, keepdim=keep),
    "ReduceLogSum": lambda x, dims, keep: x.sum(dims, keepdim=keep).log(),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dims, keepdim=keep),
}

for _op_type, _function in _REDUCTIONS.items():
    OPS.op(_op_type, fixed_inputs=(1,))(_reduction(_function))


def _arg_extreme(largest: bool):
    def run(call: OpCall, x):
        axis = normalized_axis(call.attr("axis", 0), x.dim())
        keep = bool(call.attr("keepdims", 1))
        find = torch.argmax if largest else torch.argmin
        if call.attr("select_last_index", 0):
            return x.shape[axis] - 1 - find(x.flip(axis), dim=axis, keepdim=keep)
        return find(x, dim=axis, keepdim=keep)

    return run


OPS.op("ArgMax")(_arg_extreme(largest=True))
OPS.op("ArgMin")(_arg_extreme(largest=False))


@OPS.op("TopK", fixed_inputs=(1,))
def _top_k(call: OpCall, x, k=None):
    count = int(scalar(k)) if k is not None else call.attr("k")
    axis = normalized_axis(call.attr("axis", -1), x.dim())
    # A stable sort: of equal values the one with the lower index comes first, as ONNX specifies.
    values, indices = torch.sort(x, dim=axis, descending=bool(call.attr("largest", 1)), stable=True)
    return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)
