"""Rotary positions for the Realtime encoder: tables, never angles computed in fp16.

fp16 holds integers exactly only up to 2048, and p * inv_freq for p in the thousands loses every digit of the
angle in fp16, so the packages never compute an angle:
- the offline window's positions are fixed: its cos/sin tables are constants, of transformers' angles;
- the streaming step's positions grow without bound (50 per second of audio). Position p = hi * LOW + lo
  takes cos/sin of lo * f and of hi * LOW * f from two constant tables (angles in float64, stored rounded) and
  combines them by the angle-addition formulas, so every position below LOW * HIGH is as exact as fp16
  rounding of a value in [-1, 1] allows, whatever its size: 4,194,304 positions, 23.3 hours of audio.
"""

from __future__ import annotations

import torch

from voxtral_coreml.encoders.dims import FRAMES_PER_EMBEDDING

from .dims import RealtimeDims

ROPE_LOW = 1024  # rows of the table for p mod LOW
ROPE_HIGH = 4096  # rows of the table for p // LOW
MAX_POSITIONS = ROPE_LOW * ROPE_HIGH
MAX_TOKENS = MAX_POSITIONS // FRAMES_PER_EMBEDDING  # a stream's limit; the app starts a new stream before it


def inv_freq(dims: RealtimeDims) -> torch.Tensor:
    """[head_dim / 2] float32: transformers' default RoPE frequencies, computed in float64 and rounded once (its
    float32 pow rounds by instruction set; these are the same on every CPU)."""
    exponents = torch.arange(0, dims.head_dim, 2, dtype=torch.float64) / dims.head_dim
    return (1.0 / (dims.rope_theta**exponents)).float()


def per_channel(table: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[S, head_dim / 2] -> (1, heads * head_dim, 1, S): both halves of each head share a frequency."""
    per_head = torch.cat([table, table], dim=1).t()  # (head_dim, S)
    return per_head.repeat(n_heads, 1)[None, :, None, :]


def rope_tables_offline(dims: RealtimeDims) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, A, 1, S) float64 for positions 0..S-1: transformers' angles in float64 (the same on any CPU),
    rounded once to the module's dtype when it is built."""
    angles = exact_angles(torch.arange(dims.n_positions), dims)
    return per_channel(angles.cos(), dims.n_heads), per_channel(angles.sin(), dims.n_heads)


def exact_angles(positions: torch.Tensor, dims: RealtimeDims) -> torch.Tensor:
    """[P, head_dim / 2] float64 angles of integer positions."""
    return positions.double()[:, None] * inv_freq(dims).double()[None, :]


def step_tables(dims: RealtimeDims) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, LOW, half) cos/sin of lo * f, and (2, HIGH, half) of hi * LOW * f, from float64 angles."""
    low = exact_angles(torch.arange(ROPE_LOW), dims)
    high = exact_angles(torch.arange(ROPE_HIGH) * ROPE_LOW, dims)
    return torch.stack([low.cos(), low.sin()]).float(), torch.stack([high.cos(), high.sin()]).float()


def step_rope(positions: torch.Tensor, low: torch.Tensor, high: torch.Tensor, n_heads: int, dtype: torch.dtype):
    """cos, sin (1, A, 1, P) of int32 positions (< MAX_POSITIONS), by angle addition from the two tables.

    p mod LOW indexes the low table (a gather); the high row is picked by int32 comparisons against the rows'
    first positions and a one-hot matmul, because Core ML's converter turns an integer division into float math,
    which fp16 cannot do exactly."""
    lo = torch.index_select(low, 1, torch.remainder(positions, ROPE_LOW))  # (2, P, half)
    starts = torch.arange(ROPE_HIGH, dtype=torch.int32) * ROPE_LOW
    row = torch.logical_and(positions[:, None] >= starts, positions[:, None] < starts + ROPE_LOW)  # (P, HIGH)
    hi = torch.einsum("ph,chf->cpf", row.to(high.dtype), high)
    cos = lo[0] * hi[0] - lo[1] * hi[1]
    sin = lo[1] * hi[0] + lo[0] * hi[1]
    return per_channel(cos, n_heads).to(dtype), per_channel(sin, n_heads).to(dtype)
