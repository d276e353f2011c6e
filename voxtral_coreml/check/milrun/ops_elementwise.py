"""Element-wise MIL ops: binary arithmetic with numpy broadcasting, unary math, activations and casts."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from voxtral_coreml.pipeline.errors import VoxtralError

from .args import Kernel, OpArgs, Result
from .dtypes import STORAGE


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Kernel:
    """MIL binary ops take x and y and broadcast them numpy-style, which torch does natively."""
    return lambda a: fn(a.tensor("x"), a.tensor("y"))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Kernel:
    return lambda a: fn(a.tensor("x"))


def _rsqrt(a: OpArgs) -> Result:
    """rsqrt(x, epsilon=1e-12) = 1 / sqrt(x + epsilon)."""
    return torch.rsqrt(a.tensor("x") + a.number("epsilon", 1e-12))


def _log(a: OpArgs) -> Result:
    """log(x, epsilon=1e-45) = ln(x + epsilon)."""
    return torch.log(a.tensor("x") + a.number("epsilon", 1e-45))


def _inverse(a: OpArgs) -> Result:
    """inverse(x, epsilon=1e-4) = 1 / (x + epsilon)."""
    return torch.reciprocal(a.tensor("x") + a.number("epsilon", 1e-4))


def _clip(a: OpArgs) -> Result:
    """clip(x, alpha, beta) = min(max(x, alpha), beta)."""
    return torch.clamp(a.tensor("x"), min=a.number("alpha"), max=a.number("beta"))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu(a: OpArgs) -> Result:
    """gelu(x, mode="EXACT"): EXACT is erf-based; TANH_ and SIGMOID_APPROXIMATION are the spec's formulas."""
    x, mode = a.tensor("x"), a.text("mode", "EXACT")
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise VoxtralError(f"gelu mode {mode!r} is not a MIL gelu mode")


# iOS17 added the narrow integer types (iOS18 programs cast gather indices to int16 or uint16); int to int wraps
# like C. uint16 is held widened to int32 (dtypes.STORAGE), so its wrap is spelled out.
_CAST_TARGETS = ("fp16", "fp32", "int8", "uint8", "int16", "uint16", "int32", "bool")


def _cast(a: OpArgs) -> Result:
    """cast(x, dtype): float to int truncates toward zero, like numpy's astype; fp16 rounding follows."""
    dtype = a.text("dtype")
    if dtype not in _CAST_TARGETS:
        raise VoxtralError(f"cast to {dtype!r} is not one of the MIL cast dtypes {_CAST_TARGETS}")
    x = a.tensor("x")
    if dtype == "uint16":
        return x.to(torch.int64).remainder(1 << 16).to(STORAGE[dtype])
    return x.to(STORAGE[dtype])


def _floor_div(a: OpArgs) -> Result:
    """floor_div(x, y): x / y rounded toward negative infinity, for ints and floats alike (-7 // 2 = -4)."""
    return torch.div(a.tensor("x"), a.tensor("y"), rounding_mode="floor")


def _select(a: OpArgs) -> Result:
    """select(cond, a, b): a where cond is true, else b; the three broadcast numpy-style."""
    return torch.where(a.tensor("cond"), a.tensor("a"), a.tensor("b"))


KERNELS: dict[str, Kernel] = {
    "add": _binary(torch.add),
    "sub": _binary(torch.sub),
    "mul": _binary(torch.mul),
    "real_div": _binary(torch.true_divide),
    "pow": _binary(torch.pow),
    "maximum": _binary(torch.maximum),
    "minimum": _binary(torch.minimum),
    "sqrt": _unary(torch.sqrt),
    "rsqrt": _rsqrt,
    "inverse": _inverse,
    "exp": _unary(torch.exp),
    "log": _log,
    "erf": _unary(torch.erf),
    "abs": _unary(torch.abs),
    "square": _unary(torch.square),
    "tanh": _unary(torch.tanh),
    "sigmoid": _unary(torch.sigmoid),
    "relu": _unary(torch.relu),
    "silu": _unary(F.silu),
    "gelu": _gelu,
    "clip": _clip,
    "cast": _cast,
    "identity": lambda a: a.tensor("x"),
    "floor_div": _floor_div,
    "equal": _binary(torch.eq),
    "not_equal": _binary(torch.ne),
    "less": _binary(torch.lt),
    "less_equal": _binary(torch.le),
    "greater": _binary(torch.gt),
    "greater_equal": _binary(torch.ge),
    "logical_and": _binary(torch.logical_and),
    "logical_or": _binary(torch.logical_or),
    "logical_xor": _binary(torch.logical_xor),
    "logical_not": _unary(torch.logical_not),
    "select": _select,
}
