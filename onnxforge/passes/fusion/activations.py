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
from onnxforge.ir.patterns import (
    Declined,
    PatternBuilder,
    PatternValue,
    RewriteRule,
    decline,
    is_exactly,
)
from onnxforge.passes.fusion.base import FusionContext, RuleBasedPass
from onnxforge.pipeline.registry import register_pass

GELU_MIN_OPSET = 20
SWISH_MIN_OPSET = 24
HARDSWISH_MIN_OPSET = 14
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715

Pattern = Callable[[PatternBuilder, PatternValue], PatternValue]


def _is_float32(match, x: gs.Tensor) -> bool | Declined:
    """Only float32 is fused: onnxruntime's CPU kernels of the fused ops are float only."""
    if x.dtype == np.float32:
        return True
    return decline(f"the input is {_dtype_name(x)}: onnxruntime's CPU kernels of the fused op are float32 only")


def _dtype_name(x: gs.Tensor) -> str:
    return np.dtype(x.dtype).name if x.dtype is not None else "of unknown type"


def _constant_is(name: str, constant: gs.Constant, exact: float) -> bool | Declined:
    """Whether `constant` is `exact` as float32 holds it; if not, why the rule declines."""
    if is_exactly(constant.values, exact):
        return True
    values = np.unique(np.asarray(constant.values).reshape(-1))
    if values.size != 1:
        return decline(f"{name} holds {values.size} distinct values, not {np.float32(exact)!s} alone")
    # Printed in the constant's own type's shortest digits: 0.0447 in float32, not 0.04470000043511391.
    return decline(f"{name} is {values[0]!s}, not {np.float32(exact)!s} as the fused op computes it")


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


def _erf_gelu_applies(
    match, x: gs.Tensor, sqrt2: gs.Constant | None = None, rsqrt2: gs.Constant | None = None
) -> bool | Declined:
    """Float32, and x divided by sqrt(2) (or multiplied by 1/sqrt(2)) exactly, not by a value near it
    (sqrt(2) rounded to float16, 1.4140625, is 1e-4 away: fused, the outputs would move past the lossless bound)."""
    if sqrt2 is not None:
        return _is_float32(match, x) and _constant_is("the divisor", sqrt2, SQRT2)
    return _is_float32(match, x) and _constant_is("the factor", rsqrt2, 1.0 / SQRT2)


def _tanh_of(argument: Pattern) -> Pattern:
    def factor(op, x):
        return op.Add(op.Tanh(argument(op, x)), 1.0)

    return factor


# The constants are bound, not literals, so that a rule seeing 0.0447 or sqrt(2/pi) rounded to float16 says why
# it declines (`_tanh_gelu_applies`).
def _cubic_nested(op, x):  # nn.GELU(approximate="tanh"): sqrt(2/pi) * (x + 0.044715 * (x * (x * x)))
    return op.Mul(op.Add(x, op.Mul(op.Mul(x, op.Mul(x, x)), op.const("cubic"))), op.const("scale"))


def _cubic_pow(op, x):  # Hugging Face gelu_new: torch.pow(x, 3.0)
    return op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), op.const("cubic"))), op.const("scale"))


def _cubic_left_to_right(op, x):  # 0.044715 * x * x * x, evaluated from the left
    return op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, op.const("cubic")), x), x)), op.const("scale"))


def _cubic_factored(op, x):  # Hugging Face gelu_fast: x * sqrt(2/pi) * (1 + 0.044715 * x * x)
    return op.Mul(op.Mul(x, op.const("scale")), op.Add(op.Mul(op.Mul(x, op.const("cubic")), x), 1.0))


def _tanh_gelu_applies(match, x: gs.Tensor, cubic: gs.Constant, scale: gs.Constant) -> bool | Declined:
    """Float32, with 0.044715 and sqrt(2/pi) exactly as FastGelu and Gelu(approximate="tanh") compute them."""
    return (
        _is_float32(match, x)
        and _constant_is("the cubic coefficient", cubic, GELU_CUBIC)
        and _constant_is("the tanh scale", scale, SQRT_2_OVER_PI)
    )


def _needs_opset(op_type: str, opset: int, context: FusionContext) -> Declined:
    """Declined: `op_type` is standard only from `opset`, and the backend runs no contrib op in its place."""
    return decline(
        f"{op_type} needs opset {opset} (the model has {context.opset}) where the backend does not run "
        f"onnxruntime's contrib ops: put upgrade-opset:to={opset} before fuse"
    )


def _gelu(approximate: str, contrib_op: str) -> Callable[..., gs.Tensor | Declined]:
    """Standard Gelu from opset 20, onnxruntime's `contrib_op` below it, else decline."""

    def replacement(op, x, context: FusionContext):
        if context.opset >= GELU_MIN_OPSET:
            return op.Gelu(x, approximate=approximate)
        if context.contrib_ops:
            return getattr(op, contrib_op)(x, _domain=CONTRIB_DOMAIN)
        return _needs_opset("Gelu", GELU_MIN_OPSET, context)

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
    _tanh_gelu_applies,
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
    return _needs_opset("Swish", SWISH_MIN_OPSET, context)


SILU = RewriteRule("silu", _x_sigmoid_x, _silu, _is_float32)


# --- HardSwish ------------------------------------------------------------------------------------------


def _exactly(value: float) -> Callable[[float | None], bool]:
    """An attribute predicate: the attribute is `value` as float32 holds it (ONNX stores float attributes so)."""
    return lambda actual: actual is not None and is_exactly(actual, value)


def _x_hard_sigmoid_x(op, x):  # F.hardswish below opset 14, and x * F.hardsigmoid(x)
    return op.Mul(x, op.HardSigmoid(x, alpha=_exactly(1 / 6), beta=lambda b: b is None or _exactly(0.5)(b)))


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
    if context.opset >= HARDSWISH_MIN_OPSET:
        return op.HardSwish(x)
    return decline(
        f"HardSwish needs opset {HARDSWISH_MIN_OPSET} (the model has {context.opset}): put "
        f"upgrade-opset:to={HARDSWISH_MIN_OPSET} before fuse"
    )


HARDSWISH = RewriteRule(
    "hardswish",
    [_x_hard_sigmoid_x, _x_relu6_over_6, _x_times_relu6_over_6, _x_relu6_times_sixth],
    _hardswish,
    _is_float32,
)


@register_pass("fuse-activations")
class FuseActivations(RuleBasedPass):
    """Fuse decomposed GELU (erf and tanh forms), SiLU (x * sigmoid(x)) and HardSwish into single ops."""

    needs_shapes = True
    rules = (GELU_ERF, GELU_TANH, SILU, HARDSWISH)
