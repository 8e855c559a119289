"""Torch implementations of the onnxruntime contrib ops (domain com.microsoft) that fusion passes produce.

Attention and MultiHeadAttention cover the forms onnxforge writes: 3-D [batch, sequence, hidden] inputs, the
attributes num_heads and scale, and an additive attention bias; masks by index, past key/values, rotary
embeddings and causal masking are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxforge.distill.onnx_ops import convolution, normalized
from onnxforge.distill.op_table import OpCall, OpTable, TorchConversionError

CONTRIB_DOMAIN = "com.microsoft"
OPS = OpTable()


def _activation(name: str, params: list[float]):
    """FusedConv's activation by name, with its activation_params."""
    if name == "Relu":
        return torch.relu
    if name == "Tanh":
        return torch.tanh
    if name == "Sigmoid":
        return torch.sigmoid
    if name == "LeakyRelu":
        return lambda x: F.leaky_relu(x, params[0] if params else 0.01)
    if name == "Clip":
        return lambda x: torch.clamp(x, *params) if params else x
    if name == "HardSigmoid":
        alpha, beta = params if params else (0.2, 0.5)
        return lambda x: torch.clamp(alpha * x + beta, 0, 1)
    return None


def _fused_conv_refusal(call: OpCall) -> str | None:
    name = call.attr("activation", "")
    if name and _activation(name, list(call.attr("activation_params") or [])) is None:
        return f"FusedConv activation {name!r} is not implemented"
    return None


@OPS.op("FusedConv", domain=CONTRIB_DOMAIN, refuse=_fused_conv_refusal)
def _fused_conv(call: OpCall, x, w, b=None, z=None):
    y = convolution(call, x, w, b)
    if z is not None:  # the sum input, added before the activation
        y = y + z
    name = call.attr("activation", "")
    return _activation(name, list(call.attr("activation_params") or []))(y) if name else y


def _batch_transposed(x: torch.Tensor) -> torch.Tensor:
    """FusedMatMul's transBatch: the first axis moved behind the other batch axes, [d0, ..., dn-2, dn-1] ->
    [d1, ..., dn-2, d0, dn-1]."""
    rank = x.dim()
    return x.permute(*range(1, rank - 1), 0, rank - 1) if rank > 2 else x


@OPS.op("FusedMatMul", domain=CONTRIB_DOMAIN)
def _fused_matmul(call: OpCall, a, b):
    if call.attr("transBatchA", 0):
        a = _batch_transposed(a)
    if call.attr("transBatchB", 0):
        b = _batch_transposed(b)
    a = a.transpose(-1, -2) if call.attr("transA", 0) else a
    b = b.transpose(-1, -2) if call.attr("transB", 0) else b
    alpha = call.attr("alpha", 1.0)
    y = torch.matmul(a, b)
    return y * alpha if alpha != 1.0 else y


@OPS.op("Gelu", domain=CONTRIB_DOMAIN)
def _gelu(call: OpCall, x):
    return F.gelu(x)


@OPS.op("BiasGelu", domain=CONTRIB_DOMAIN)
def _bias_gelu(call: OpCall, x, bias):
    return F.gelu(x + bias)


@OPS.op("FastGelu", domain=CONTRIB_DOMAIN)
def _fast_gelu(call: OpCall, x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


@OPS.op("QuickGelu", domain=CONTRIB_DOMAIN)
def _quick_gelu(call: OpCall, x):
    return x * torch.sigmoid(call.attr("alpha", 1.702) * x)


@OPS.op("SkipLayerNormalization", domain=CONTRIB_DOMAIN)
def _skip_layer_norm(call: OpCall, x, skip, gamma, beta=None, bias=None):
    total = x + skip if bias is None else x + skip + bias
    y, mean, inverse_std = normalized(total, -1, call.attr("epsilon", 1e-12))
    y = y * gamma if beta is None else y * gamma + beta
    return y, mean, inverse_std, total


@OPS.op("SkipSimplifiedLayerNormalization", domain=CONTRIB_DOMAIN)
def _skip_rms_norm(call: OpCall, x, skip, gamma, bias=None):
    total = x + skip if bias is None else x + skip + bias
    y, _, inverse_std = normalized(total, -1, call.attr("epsilon", 1e-12), centered=False)
    return y * gamma, None, inverse_std, total


# --- attention -----------------------------------------------------------------------------------------------


def _attended(q, k, v, heads: int, scale: float | None, bias):
    """softmax(scale * Q K^T + bias) V over `heads` heads of 3-D [batch, length, hidden] Q, K and V."""
    batch, length, hidden = q.shape
    keys = k.shape[1]
    size, value_size = hidden // heads, v.shape[2] // heads
    qh = q.reshape(batch, length, heads, size).transpose(1, 2)
    kh = k.reshape(batch, keys, heads, size).transpose(1, 2)
    vh = v.reshape(batch, keys, heads, value_size).transpose(1, 2)
    scale = scale or 1 / math.sqrt(size)  # onnxruntime reads a scale of 0 as unset too
    context = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)
    return context.transpose(1, 2).reshape(batch, length, heads * value_size)


def _attention_refusal(call: OpCall, inputs: dict[int, str], outputs: dict[int, str]) -> str | None:
    """What of an attention node onnxforge does not write: named inputs and outputs at these positions, or
    attributes other than num_heads and scale set to non-defaults."""
    given = [name for i, name in inputs.items() if i < len(call.given_inputs) and call.given_inputs[i]]
    used = [name for i, name in outputs.items() if i < len(call.used_outputs) and call.used_outputs[i]]
    attrs = [
        a
        for a in ("unidirectional", "do_rotary", "qkv_hidden_sizes", "past_present_share_buffer")
        if call.attr(a)
    ]
    if given or used or attrs:
        return f"{call.op} with {', '.join(given + used + attrs)} is not implemented"
    return None


def _contrib_attention_refusal(call: OpCall) -> str | None:
    return _attention_refusal(call, {3: "mask_index", 4: "past", 6: "past_sequence_length"}, {1: "present"})


@OPS.op("Attention", domain=CONTRIB_DOMAIN, fixed_inputs=(5,), refuse=_contrib_attention_refusal)
def _attention(call: OpCall, x, weight, bias=None, mask_index=None, past=None, attention_bias=None):
    projected = torch.matmul(x, weight)
    if bias is not None:
        projected = projected + bias
    q, k, v = projected.chunk(3, dim=-1)
    return _attended(q, k, v, call.attr("num_heads"), call.attr("scale"), attention_bias)


def _multi_head_attention_refusal(call: OpCall) -> str | None:
    inputs = {4: "key_padding_mask", 6: "past_key", 7: "past_value", 8: "past_sequence_length"}
    return _attention_refusal(call, inputs, {1: "present_key", 2: "present_value", 3: "qk"})


@OPS.op("MultiHeadAttention", domain=CONTRIB_DOMAIN, fixed_inputs=(5,), refuse=_multi_head_attention_refusal)
def _multi_head_attention(call: OpCall, q, k=None, v=None, bias=None, key_padding_mask=None, attention_bias=None):
    if q.dim() != 3 or k is None or v is None or k.dim() != 3 or v.dim() != 3:
        raise TorchConversionError(
            f"MultiHeadAttention {call.name!r}: only separate 3-D query, key and value are implemented "
            "(packed QKV or KV and 4-D key/value are not)"
        )
    if bias is not None:  # one bias for Q, K and V, packed in that order
        hidden = q.shape[-1]
        q, k, v = q + bias[:hidden], k + bias[hidden : 2 * hidden], v + bias[2 * hidden :]
    return _attended(q, k, v, call.attr("num_heads"), call.attr("scale"), attention_bias)
