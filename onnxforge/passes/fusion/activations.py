"""Fuse decomposed activations into one op: GELU (erf and tanh forms), SiLU and HardSwish.

Each rule lists the spellings exporters emit (torch.onnx.export of nn.GELU, hand-written and Hugging Face
formulas). The replacement is the standard op where the model's opset has it, else onnxruntime's
com.microsoft op when the backend is onnxruntime; otherwise the match is declined. SiLU is the exception:
on onnxruntime it always becomes the contrib op, the faster one there (see `_silu`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.ops import CONTRIB_DOMAIN
from onnxforge.ir.patterns import PatternBuilder, PatternValue, RewriteRule
from onnxforge.passes.fusion.base import FusionContext, RuleBasedPass
from onnxforge.passes.registry import register_pass

GELU_MIN_OPSET = 20
SWISH_MIN_OPSET = 24
HARDSWISH_MIN_OPSET = 14
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715

Pattern = Callable[[PatternBuilder, PatternValue], PatternValue]


def _is_float32(match, x: gs.Tensor) -> bool:
    """Only float32 is fused: onnxruntime's CPU kernels of the fused ops are float only."""
    return x.dtype == np.float32


# --- GELU -----------------------------------------------------------------------------------------------


def _half_x_times(factor: Pattern) -> list[Pattern]:
    """0.5 * x * factor(x), in the three associations exporters write."""

    def x_factor_half(op, x):  # nn.GELU: (x * factor) * 0.5
        return op.Mul(op.Mul(x, factor(op, x)), 0.5)

    def half_x_factor(op, x):  # by hand: 0.5 * x * factor
        return op.Mul(op.Mul(x, 0.5), factor(op, x))

    def x_half_factor(op, x):  # x * (0.5 * factor)
        return op.Mul(x, op.Mul(factor(op, x), 0.5))

    return [x_factor_half, half_x_factor, x_half_factor]


def _erf_of_x_over_sqrt2(op, x):
    return op.Add(op.Erf(op.Div(x, op.const("sqrt2"))), 1.0)


def _erf_of_x_times_rsqrt2(op, x):
    return op.Add(op.Erf(op.Mul(x, op.const("rsqrt2"))), 1.0)


def _exactly(values: np.ndarray, exact: float) -> bool:
    """Whether every element is `exact` as float32 computes it: within one float32 step of the exact value.

    Not a looser tolerance: sqrt(2) rounded to float16 (1.4140625), which fp16 models widened to float32
    carry, is 1e-4 away, and fusing it into Gelu would change the outputs by more than the lossless bound.
    """
    values = np.asarray(values)
    if values.size == 0 or values.size > 64 or values.dtype.kind != "f":
        return False
    return bool(np.all(np.abs(values.astype(np.float64) - exact) <= np.spacing(np.float32(exact))))


def _erf_gelu_applies(
    match, x: gs.Tensor, sqrt2: gs.Constant | None = None, rsqrt2: gs.Constant | None = None
) -> bool:
    """Float32, and x divided by sqrt(2) (or multiplied by 1/sqrt(2)) exactly, not by a value near it."""
    if sqrt2 is not None:
        return _is_float32(match, x) and _exactly(sqrt2.values, SQRT2)
    return _is_float32(match, x) and rsqrt2 is not None and _exactly(rsqrt2.values, 1.0 / SQRT2)


def _tanh_of(argument: Pattern) -> Pattern:
    def factor(op, x):
        return op.Add(op.Tanh(argument(op, x)), 1.0)

    return factor


def _cubic_nested(op, x):  # nn.GELU(approximate="tanh"): sqrt(2/pi) * (x + 0.044715 * (x * (x * x)))
    return op.Mul(op.Add(x, op.Mul(op.Mul(x, op.Mul(x, x)), GELU_CUBIC)), SQRT_2_OVER_PI)


def _cubic_pow(op, x):  # Hugging Face gelu_new: torch.pow(x, 3.0)
    return op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), GELU_CUBIC)), SQRT_2_OVER_PI)


def _cubic_left_to_right(op, x):  # 0.044715 * x * x * x, evaluated from the left
    return op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, GELU_CUBIC), x), x)), SQRT_2_OVER_PI)


def _cubic_factored(op, x):  # Hugging Face gelu_fast: x * sqrt(2/pi) * (1 + 0.044715 * x * x)
    return op.Mul(op.Mul(x, SQRT_2_OVER_PI), op.Add(op.Mul(op.Mul(x, GELU_CUBIC), x), 1.0))


def _gelu(approximate: str, contrib_op: str) -> Callable[..., gs.Tensor | None]:
    """Standard Gelu from opset 20, onnxruntime's `contrib_op` below it, else decline."""

    def replacement(op, x, context: FusionContext):
        if context.opset >= GELU_MIN_OPSET:
            return op.Gelu(x, approximate=approximate)
        if context.contrib_ops:
            return getattr(op, contrib_op)(x, _domain=CONTRIB_DOMAIN)
        return None

    return replacement


GELU_ERF = RewriteRule(
    "gelu-erf",
    [p for factor in (_erf_of_x_over_sqrt2, _erf_of_x_times_rsqrt2) for p in _half_x_times(factor)],
    _gelu("none", "Gelu"),
    _erf_gelu_applies,
)
GELU_TANH = RewriteRule(
    "gelu-tanh",
    [
        p
        for argument in (_cubic_nested, _cubic_pow, _cubic_left_to_right, _cubic_factored)
        for p in _half_x_times(_tanh_of(argument))
    ],
    _gelu("tanh", "FastGelu"),
    _is_float32,
)


# --- SiLU -----------------------------------------------------------------------------------------------


def _x_sigmoid_x(op, x):
    return op.Mul(x, op.Sigmoid(x))


def _silu(op, x, context: FusionContext):
    """onnxruntime: QuickGelu(alpha=1), which is x * sigmoid(x); other backends: Swish from opset 24.

    On onnxruntime QuickGelu even where Swish exists: on onnxruntime 1.32 its Swish kernel measured more
    than twice as slow as Sigmoid and Mul, which its own optimizer turns into QuickGelu.
    """
    if context.contrib_ops:
        return op.QuickGelu(x, alpha=1.0, _domain=CONTRIB_DOMAIN)
    if context.opset >= SWISH_MIN_OPSET:
        return op.Swish(x)
    return None


SILU = RewriteRule("silu", _x_sigmoid_x, _silu, _is_float32)


# --- HardSwish ------------------------------------------------------------------------------------------


def _near(value: float) -> Callable[[float | None], bool]:
    return lambda actual: actual is not None and abs(actual - value) <= 1e-6


def _x_hard_sigmoid_x(op, x):  # F.hardswish below opset 14, and x * F.hardsigmoid(x)
    return op.Mul(x, op.HardSigmoid(x, alpha=_near(1 / 6), beta=lambda b: b is None or _near(0.5)(b)))


def _relu6_of_x_plus_3(op, x):
    return op.Clip(op.Add(x, 3.0), 0.0, 6.0)


def _x_relu6_over_6(op, x):  # x * F.relu6(x + 3) / 6
    return op.Div(op.Mul(x, _relu6_of_x_plus_3(op, x)), 6.0)


def _x_times_relu6_over_6(op, x):  # x * (F.relu6(x + 3) / 6)
    return op.Mul(x, op.Div(_relu6_of_x_plus_3(op, x), 6.0))


def _x_relu6_times_sixth(op, x):  # x * F.relu6(x + 3) * (1 / 6)
    return op.Mul(op.Mul(x, _relu6_of_x_plus_3(op, x)), 1 / 6)


def _hardswish(op, x, context: FusionContext):
    """Standard HardSwish from opset 14; onnxruntime has no contrib op for it, so decline below."""
    return op.HardSwish(x) if context.opset >= HARDSWISH_MIN_OPSET else None


HARDSWISH = RewriteRule(
    "hardswish",
    [_x_hard_sigmoid_x, _x_relu6_over_6, _x_times_relu6_over_6, _x_relu6_times_sixth],
    _hardswish,
    _is_float32,
)


@register_pass("fuse-activations")
class FuseActivations(RuleBasedPass):
    """Fuse decomposed GELU (erf and tanh forms), SiLU (x * sigmoid(x)) and HardSwish into single ops."""

    order = 40
    needs_shapes = True
    rules = (GELU_ERF, GELU_TANH, SILU, HARDSWISH)
