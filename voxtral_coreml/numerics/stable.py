"""Float results that are a function of the inputs alone, whatever CPU, core count or BLAS computed them.

PyTorch's CPU kernels round differently from one machine to another: BLAS kernels and vectorized math chosen by
instruction set (AVX-512, AVX2, NEON), sums split by thread count, oneDNN or not. In float32 that reaches the last
bits of every result (and a metric's third decimal). The rules every DVC output follows:

- compute in float64: machines then agree to about 1e-15 relative;
- store a tensor on a fixed grid, 2^-20 of its peak's power of two (`stored_float32`): a value changes only where
  two machines' float64 results straddle a grid boundary, about 1e-9 per value (1e-15 apart on a 1e-6 grid); plain
  float32 rounding would be finer for small values, and flip a hundred times as often;
- reduce with exact sums (`exact_sum`, math.fsum: the correctly rounded sum, in any order), so that the same
  inputs give the same metric bit for bit;
- store a metric rounded to what it means (`round_decimals`, `round_significant`), and a quantity that only
  measures rounding noise (two float64 computations of the same math) at a resolution far above that noise
  (`resolved`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is handled: the report stage reads JSON only
    import torch

# Two float64 computations of the same math agree far above this (about 290 dB measured on the demo encoders):
# a comparison of them is reported up to here, and no further.
FLOAT64_RESOLUTION_DB = 200.0
STORED_BITS = 20  # a stored tensor's grid: 2^-20 of its peak (float32 holds 24 bits, so every multiple is exact)


def float64(t: torch.Tensor) -> torch.Tensor:
    """t in float64 (exact for any float32, fp16 or bf16 value)."""
    import torch

    return t.to(torch.float64)


def stored_float32(t: torch.Tensor) -> torch.Tensor:
    """A float64 result as a DVC output stores it: each value rounded to the nearest multiple of 2^-STORED_BITS of
    the tensor's peak's power of two (at least 125 dB PSNR), held exactly in float32. The grid moves only if the peak
    is within rounding noise of a power of two."""
    import torch

    peak = t.detach().abs().max().item() if t.numel() else 0.0
    step = math.ldexp(1.0, math.frexp(peak)[1] - STORED_BITS)  # a power of two: t / step is exact
    return (torch.round(t / step) * step).to(torch.float32).contiguous()


def as_float64_array(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any float tensor or array as a flat float64 numpy array (exact widening)."""
    array = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return np.ascontiguousarray(array, dtype=np.float64).reshape(-1)


def exact_sum(values: np.ndarray) -> float:
    """The correctly rounded sum of float64 values: the same on every machine, whatever the order or SIMD width."""
    return math.fsum(values.tolist())


def exact_row_sums(values: np.ndarray) -> list[float]:
    """exact_sum of each row of a 2-D float64 array."""
    return [math.fsum(row) for row in values.tolist()]


def round_decimals(x: float, decimals: int) -> float:
    """x rounded to a fixed number of decimals (PSNR in dB, a cosine)."""
    return round(float(x), decimals)


def round_significant(x: float, digits: int) -> float:
    """x rounded to `digits` significant digits (an error whose scale varies)."""
    return float(f"{float(x):.{digits - 1}e}")


def resolved(x: float, resolution: float) -> float:
    """x, or 0.0 below `resolution`: a difference that size is rounding noise, not a result."""
    return 0.0 if abs(x) < resolution else float(x)
