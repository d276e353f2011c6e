"""Attention cores for (B, C, 1, S) tensors: swappable, parameter-free, chosen in conf/ (`build.attention`).

All three compute softmax(q kᵀ + mask) v per head with q already scaled (mask: an optional additive
(1, Sk, 1, Sq) tensor, for causal encoders); they differ only in how the work is cut into Core ML ops, which
decides Neural Engine compile time (it grows with the op count) and tiling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from voxtral_coreml.pipeline.errors import VoxtralError

Mask = torch.Tensor | None


class SplitHeads(nn.Module):
    """ANE: one einsum per head on (B, C, 1, S) slices, softmax over the key axis (dim 1), no reshapes."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        head_dim = q.shape[1] // self.n_heads
        k_t = k.transpose(1, 3)  # (B, S_k, 1, C): one transpose per layer, shared by every head
        heads = []
        for qh, kh, vh in zip(
            q.split(head_dim, dim=1), k_t.split(head_dim, dim=3), v.split(head_dim, dim=1), strict=True
        ):
            heads.append(_attend(qh, kh, vh, mask))
        return torch.cat(heads, dim=1)


class SplitHeadsChunkedQueries(SplitHeads):
    """ANE: per-head split with queries cut into ceil(S / chunk) pieces, bounding each score tile (whisperkittools'
    SplitHeadsQ, which ships Whisper's audio encoder on devices). Each (chunk, head) pair costs 2 einsum + 1 softmax;
    the cutting and joining around them is nested in the order that needs fewer split and concat ops."""

    def __init__(self, n_heads: int, query_chunk: int) -> None:
        super().__init__(n_heads)
        self.query_chunk = query_chunk

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        head_dim = q.shape[1] // self.n_heads
        n_chunks = math.ceil(q.shape[3] / self.query_chunk)  # ceil: 1500 queries keep their tail
        k_heads = k.transpose(1, 3).split(head_dim, dim=3)  # (B, S_k, 1, c) per head: one transpose per layer
        v_heads = v.split(head_dim, dim=1)

        def heads_of(q_part: torch.Tensor) -> list[torch.Tensor]:
            return q_part.split(head_dim, dim=1)

        def chunks_of(part: torch.Tensor | None) -> list[torch.Tensor | None]:  # queries, or the mask's query axis
            if part is None or n_chunks == 1:  # a split larger than the axis does not convert (coremltools 9)
                return [part] * n_chunks
            return list(part.split(self.query_chunk, dim=3))

        if n_chunks <= self.n_heads:  # Mini: 6 chunks < 20 heads, so 1 + 6 splits of q and 6 + 1 concats
            rows = []
            for q_chunk, m_chunk in zip(chunks_of(q), chunks_of(mask), strict=True):
                pairs = zip(heads_of(q_chunk), k_heads, v_heads, strict=True)
                rows.append(torch.cat([_attend(qh, kh, vh, m_chunk) for qh, kh, vh in pairs], dim=1))
            return torch.cat(rows, dim=3)
        columns = []
        for qh, kh, vh in zip(heads_of(q), k_heads, v_heads, strict=True):
            pieces = zip(chunks_of(qh), chunks_of(mask), strict=True)
            columns.append(torch.cat([_attend(qc, kh, vh, mc) for qc, mc in pieces], dim=3))
        return torch.cat(columns, dim=1)


class FusedHeads(nn.Module):
    """ANE: all heads in one einsum pair, in the form MIL's einsum runs natively (nchw,nwhu->nchu: batched over
    the head axis h), with the softmax over the key axis (dim 1): fewest ops."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        b, c, _, s = q.shape
        head_dim = c // self.n_heads
        q_h = q.reshape(b, self.n_heads, head_dim, s).transpose(1, 2)  # (B, c, H, Sq)
        k_h = k.reshape(b, self.n_heads, head_dim, -1).permute(0, 3, 1, 2)  # (B, Sk, H, c)
        v_h = v.reshape(b, self.n_heads, head_dim, -1).transpose(1, 2)  # (B, c, H, Sk)
        weights = _softmax_keys(torch.einsum("nchw,nwhu->nchu", k_h, q_h), mask)  # (B, Sk, H, Sq)
        out = torch.einsum("nchw,nwhu->nchu", v_h, weights)  # (B, c, H, Sq)
        return out.transpose(1, 2).reshape(b, c, 1, s)


def _softmax_keys(scores: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Softmax over the key axis (dim 1) of (B, Sk, H, Sq) scores, after the additive mask if any."""
    return (scores if mask is None else scores + mask).softmax(dim=1)


def _attend(qh: torch.Tensor, kh_t: torch.Tensor, vh: torch.Tensor, mask: Mask = None) -> torch.Tensor:
    """One head: q (B, c, 1, Sq), kᵀ (B, Sk, 1, c), v (B, c, 1, Sk) -> (B, c, 1, Sq)."""
    weights = _softmax_keys(torch.einsum("bchq,bkhc->bkhq", qh, kh_t), mask)
    return torch.einsum("bkhq,bchk->bchq", weights, vh)


ATTENTION_CORES = ("split_heads", "split_heads_chunked", "fused_heads")


def make_attention_core(name: str, n_heads: int, query_chunk: int | None) -> nn.Module:
    if name == "split_heads":
        return SplitHeads(n_heads)
    if name == "split_heads_chunked":
        if query_chunk is None or query_chunk < 1:
            raise VoxtralError(f"build.query_chunk: split_heads_chunked needs a query_chunk >= 1, got {query_chunk}")
        return SplitHeadsChunkedQueries(n_heads, query_chunk)
    if name == "fused_heads":
        return FusedHeads(n_heads)
    raise VoxtralError(f"build.attention: unknown attention core {name!r}; choose one of {', '.join(ATTENTION_CORES)}")
