"""Voxtral Realtime's causal encoder + projector, laid out for the Apple Neural Engine. Read top to bottom.

The math is transformers' `VoxtralRealtimeEncoder` + `VoxtralRealtimeMultiModalProjector`; the layout follows
Apple's ml-ane-transformers as the 2507 module does: activations are (B, C, 1, S), channels first, time last.

    mel [1, M, F] -> causal conv1, conv2 (stride 2) -> N layers (RMSNorm, RoPE attention over a sliding
        window of W positions, RMSNorm, SwiGLU) -> RMSNorm -> projector (4 frames) -> [1, F/8, H]

Two modules share the weights: `RealtimeEncoderANE` encodes a fixed window from the start of a stream (the
offline package), `RealtimeStepANE` encodes the next 8k mel frames given the stream's state: the convs' left
context and, per layer, keys (rotated) and values of the last positions in a ring buffer of R slots.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from voxtral_coreml.encoders.attention import make_attention_core
from voxtral_coreml.encoders.dims import FRAMES_PER_EMBEDDING
from voxtral_coreml.encoders.model import Projector, pointwise, projector_conv_weight, scalar_like

from .dims import CONV1_CONTEXT, CONV2_CONTEXT, MEL_FRAMES_PER_TOKEN, RealtimeDims
from .rope import ROPE_HIGH, ROPE_LOW, rope_tables_offline, step_rope, step_tables

RMS_NORM_EPS = 1e-5
MASKED = -1e4  # added to the scores of keys a query may not see: exp() of it is 0 in fp16


class ChannelRMSNorm(nn.Module):
    """ANE: RMSNorm over the channel axis (dim 1) of (B, C, 1, S), no transpose to (B, S, C)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = (x * x).mean(dim=1, keepdim=True)
        return x * torch.rsqrt(variance + scalar_like(RMS_NORM_EPS, x)) * self.weight.view(1, -1, 1, 1)


def rotate_half(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """RoPE's rotate_half per head on (B, heads x head_dim, 1, S): (x1, x2) -> (-x2, x1) by one rank-4 view of
    each head's halves (no weights: folding it into a second projection would add 17% to the package)."""
    b, a, _, s = x.shape
    halves = x.reshape(b, n_heads, 2, a // n_heads // 2 * s)
    return torch.cat([-halves[:, :, 1:], halves[:, :, :1]], dim=2).reshape(b, a, 1, s)


class RotaryAttention(nn.Module):
    """ANE: q, k, v as 1x1 convs on (B, C, 1, S) and RoPE applied in that layout (cos/sin per channel); the
    1/sqrt(head_dim) scale is folded into q's weights."""

    def __init__(self, dims: RealtimeDims, core: nn.Module) -> None:
        super().__init__()
        d, a = dims.d_model, dims.attn_dim
        self.n_heads = dims.n_heads
        self.q_proj = pointwise(d, a)
        self.k_proj = pointwise(d, a, bias=False)  # Whisper's k_proj has no bias
        self.v_proj = pointwise(d, a)
        self.o_proj = pointwise(a, d)
        self.core = core

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k = self.q_proj(x), self.k_proj(x)
        q = q * cos + rotate_half(q, self.n_heads) * sin
        k = k * cos + rotate_half(k, self.n_heads) * sin
        return q, k, self.v_proj(x)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        """(out, k, v): keys and values of x's positions, for the caller's cache; past ones come first."""
        q, k, v = self.project(x, cos, sin)
        keys = k if past_k is None else torch.cat([past_k, k], dim=3)
        values = v if past_v is None else torch.cat([past_v, v], dim=3)
        return self.o_proj(self.core(q, keys, values, mask)), k, v


class SwiGLU(nn.Module):
    def __init__(self, dims: RealtimeDims) -> None:
        super().__init__()
        self.gate_proj = pointwise(dims.d_model, dims.ffn_dim, bias=False)
        self.up_proj = pointwise(dims.d_model, dims.ffn_dim, bias=False)
        self.down_proj = pointwise(dims.ffn_dim, dims.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RealtimeLayer(nn.Module):
    def __init__(self, dims: RealtimeDims, core: nn.Module) -> None:
        super().__init__()
        self.self_attn_layer_norm = ChannelRMSNorm(dims.d_model)
        self.self_attn = RotaryAttention(dims, core)
        self.final_layer_norm = ChannelRMSNorm(dims.d_model)
        self.mlp = SwiGLU(dims)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        attended, k, v = self.self_attn(self.self_attn_layer_norm(x), cos, sin, mask, past_k, past_v)
        x = x + attended
        return x + self.mlp(self.final_layer_norm(x)), k, v


class RealtimeBody(nn.Module):
    """The weights both modules share, under transformers' names (less `audio_tower.`/`embedder.`), named as
    the 2507 module's are (conv1, conv2, layers.N, ..., multi_modal_projector) so compression treats both alike."""

    def __init__(self, dims: RealtimeDims, attention: str, query_chunk: int) -> None:
        super().__init__()
        d = dims.d_model
        self.dims = dims
        # ANE: Conv1d over time as Conv2d with a (1, k) kernel on (B, C, 1, T); causal: padded on the left only.
        self.conv1 = nn.Conv2d(dims.n_mels, d, (1, 3))
        self.conv2 = nn.Conv2d(d, d, (1, 3), stride=(1, 2))
        core = make_attention_core(attention, dims.n_heads, query_chunk)  # shared: it has no weights
        self.layers = nn.ModuleList(RealtimeLayer(dims, core) for _ in range(dims.n_layers))
        self.norm = ChannelRMSNorm(d)
        self.multi_modal_projector = Projector(dims)

    def stem(self, mel: torch.Tensor, conv1_context: torch.Tensor, conv2_context: torch.Tensor):
        """mel (B, M, 1, T) after its left contexts -> (B, d, 1, T/2), and the contexts the next call needs."""
        x = torch.cat([conv1_context.to(mel.dtype), mel], dim=3)
        h = F.gelu(self.conv1(x))
        y = torch.cat([conv2_context.to(h.dtype), h], dim=3)
        context = conv1_context.dtype  # the state's dtype (fp16), whatever the weights'
        return F.gelu(self.conv2(y)), x[..., -CONV1_CONTEXT:].to(context), y[..., -CONV2_CONTEXT:].to(context)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.multi_modal_projector(self.norm(x))  # (B, H, 1, T/8)
        return embeddings.squeeze(2).transpose(1, 2).float()  # [B, T/8, H] float32


def window_mask(
    query_pos: torch.Tensor, key_pos: torch.Tensor, valid: torch.Tensor, window: int, dtype
) -> torch.Tensor:
    """(1, Sk, 1, Sq) additive mask: key j is seen by query i iff valid[j] and 0 <= pos_i - pos_j < window."""
    age = query_pos[None, :] - key_pos[:, None]  # (Sk, Sq), int32
    seen = torch.logical_and(torch.logical_and(age >= 0, age < window), valid[:, None])  # coremltools: no `&`
    one = torch.full((), 1.0, dtype=dtype)  # constants in the activation dtype (coremltools promotes floats)
    return ((seen.to(dtype) - one) * torch.full((), -MASKED, dtype=dtype))[None, :, None, :]


class RealtimeEncoderANE(RealtimeBody):
    """The offline window: `dims.mel_frames` mel frames from the start of a stream -> [1, frames/8, H]."""

    def __init__(self, dims: RealtimeDims, attention: str = "fused_heads", query_chunk: int = 256) -> None:
        super().__init__(dims, attention, query_chunk)
        s, a = dims.n_positions, dims.attn_dim
        self.register_buffer("rope_cos", torch.zeros(1, a, 1, s))
        self.register_buffer("rope_sin", torch.zeros(1, a, 1, s))
        self.register_buffer("positions", torch.zeros(s, dtype=torch.int32))

    def forward(self, mel_spectrogram: torch.Tensor) -> torch.Tensor:
        x = self.offline_stem(mel_spectrogram)
        mask = self.causal_mask(x.dtype)
        for layer in self.layers:
            x, _, _ = layer(x, self.rope_cos, self.rope_sin, mask)
        return self.head(x)

    def offline_stem(self, mel_spectrogram: torch.Tensor) -> torch.Tensor:
        x = mel_spectrogram.unsqueeze(2).to(self.conv1.weight.dtype)
        # A stream starts from zeros: conv1 padded by 2 on both sides keeps its first T outputs (they see only
        # the left padding); conv2 padded by 1 reads no right padding at all for an even T.
        h = F.gelu(F.conv2d(x, self.conv1.weight, self.conv1.bias, padding=(0, CONV1_CONTEXT)))
        h = h[..., : x.shape[3]]
        return F.gelu(F.conv2d(h, self.conv2.weight, self.conv2.bias, stride=(1, 2), padding=(0, CONV2_CONTEXT)))

    def causal_mask(self, dtype: torch.dtype) -> torch.Tensor:
        everyone = torch.ones_like(self.positions, dtype=torch.bool)
        return window_mask(self.positions, self.positions, everyone, self.dims.sliding_window, dtype)

    def stages(self) -> list:
        """stem, each layer, head as one-tensor functions: the sensitivity scan and GPTQ rerun from any of them (the
        mask is made where x is: calibration may move the module to an accelerator after this call)."""

        def run(layer):
            return lambda x: layer(x, self.rope_cos, self.rope_sin, self.causal_mask(x.dtype))[0]

        return [self.offline_stem, *map(run, self.layers), self.head]


class RealtimeStepANE(RealtimeBody):
    """The streaming step: 8k mel frames and the stream's state -> k embeddings and the next state.

    State (fp16): conv1_context (1, M, 1, 2) mel frames, conv2_context (1, d, 1, 1) conv1 frames, and
    key_cache/value_cache (N, A, 1, R): position p lives in slot p mod R. `position` (int32) counts the tokens
    emitted so far (encoder position = 4 x position)."""

    def __init__(self, dims: RealtimeDims, tokens_per_step: int, attention="fused_heads", query_chunk=256) -> None:
        super().__init__(dims, attention, query_chunk)
        self.tokens_per_step = tokens_per_step
        half = dims.head_dim // 2
        self.register_buffer("rope_low", torch.zeros(2, ROPE_LOW, half))  # cos/sin tables: see rope.step_rope
        self.register_buffer("rope_high", torch.zeros(2, ROPE_HIGH, half))
        self.register_buffer("slots", torch.zeros(dims.cache_slots, dtype=torch.int32))

    @property
    def new_positions(self) -> int:
        return self.tokens_per_step * FRAMES_PER_EMBEDDING

    def forward(self, mel_chunk, position, conv1_context, conv2_context, key_cache, value_cache):
        dims = self.dims
        x = mel_chunk.unsqueeze(2).to(self.conv1.weight.dtype)
        x, conv1_next, conv2_next = self.stem(x, conv1_context, conv2_context)
        first = position * FRAMES_PER_EMBEDDING  # (1,) int32: the encoder position of x's first frame
        new_pos = first + torch.arange(self.new_positions, dtype=torch.int32)
        cos, sin = step_rope(new_pos, self.rope_low, self.rope_high, dims.n_heads, x.dtype)
        mask = self.mask(first, new_pos, x.dtype)
        write = self.write_matrix(new_pos, x.dtype)  # (P, R): one-hot slot of each new position
        kept = torch.full((), 1.0, dtype=x.dtype) - write.sum(dim=0)  # (R,): 0 where a slot is overwritten
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past_k, past_v = key_cache[i : i + 1].to(x.dtype), value_cache[i : i + 1].to(x.dtype)
            x, k, v = layer(x, cos, sin, mask, past_k, past_v)
            keys.append((past_k * kept + torch.einsum("bcip,pr->bcir", k, write)).to(key_cache.dtype))
            values.append((past_v * kept + torch.einsum("bcip,pr->bcir", v, write)).to(value_cache.dtype))
        return self.head(x), conv1_next, conv2_next, torch.cat(keys), torch.cat(values)

    def mask(self, first: torch.Tensor, new_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(1, R + P, 1, P): the cache's slots (position of slot s: the last p < first with p = s mod R), then
        the new positions, each seen within the sliding window."""
        r = self.dims.cache_slots
        slot_pos = first - 1 - torch.remainder(first - 1 - self.slots + r, r)
        key_pos = torch.cat([slot_pos, new_pos])
        valid = key_pos >= 0
        return window_mask(new_pos, key_pos, valid, self.dims.sliding_window, dtype)

    def write_matrix(self, new_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(P, R) one-hot rows; only the last R new positions are written when P > R (later ones win)."""
        r = self.dims.cache_slots
        slot = torch.remainder(new_pos, r)
        onehot = slot[:, None] == self.slots[None, :]
        if self.new_positions > r:
            onehot = torch.logical_and(onehot, (torch.arange(self.new_positions) >= self.new_positions - r)[:, None])
        return onehot.to(dtype)


def body_state_dict(weights: dict[str, torch.Tensor], dims: RealtimeDims) -> dict[str, torch.Tensor]:
    """Canonical (HF) tensors -> RealtimeBody parameters: the only place their shapes change."""
    scale = dims.head_dim**-0.5
    state: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        key = name.removeprefix("audio_tower.").removeprefix("embedder.")
        if name == "multi_modal_projector.linear_1.weight":
            state[key] = projector_conv_weight(w, dims.d_model)
            continue
        if ".q_proj." in name:
            w = w * scale  # softmax(q k^T * scale): the scale folded into q's weights and bias
        if w.dim() == 2:
            w = w[:, :, None, None]  # Linear [out, in] -> 1x1 conv [out, in, 1, 1]
        elif w.dim() == 3:
            w = w[:, :, None, :]  # Conv1d [out, in, k] -> Conv2d [out, in, 1, k]
        state[key] = w
    return state


def _build(module: nn.Module, weights, dims, buffers: dict[str, torch.Tensor]):
    dtype = next(iter(weights.values())).dtype
    state = body_state_dict(weights, dims)
    state.update({k: v if v.dtype == torch.int32 else v.to(dtype) for k, v in buffers.items()})
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def build_offline_encoder(weights, dims: RealtimeDims, attention="fused_heads", query_chunk=256):
    """The offline module with `weights` assigned in place (built on the meta device: nothing is copied)."""
    with torch.device("meta"):
        model = RealtimeEncoderANE(dims, attention, query_chunk)
    cos, sin = rope_tables_offline(dims)
    buffers = {"rope_cos": cos, "rope_sin": sin, "positions": torch.arange(dims.n_positions, dtype=torch.int32)}
    return _build(model, weights, dims, buffers)


def build_step_encoder(weights, dims: RealtimeDims, tokens_per_step: int, attention="fused_heads", query_chunk=256):
    with torch.device("meta"):
        model = RealtimeStepANE(dims, tokens_per_step, attention, query_chunk)
    low, high = step_tables(dims)
    buffers = {"rope_low": low, "rope_high": high, "slots": torch.arange(dims.cache_slots, dtype=torch.int32)}
    return _build(model, weights, dims, buffers)


def initial_state(dims: RealtimeDims, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A fresh stream: zero contexts (the convs' causal padding) and empty caches (masked by position)."""
    n, a, r = dims.n_layers, dims.attn_dim, dims.cache_slots
    return {
        "conv1_context": torch.zeros(1, dims.n_mels, 1, CONV1_CONTEXT, dtype=dtype),
        "conv2_context": torch.zeros(1, dims.d_model, 1, CONV2_CONTEXT, dtype=dtype),
        "key_cache": torch.zeros(n, a, 1, r, dtype=dtype),
        "value_cache": torch.zeros(n, a, 1, r, dtype=dtype),
    }


def mel_frames_per_step(tokens_per_step: int) -> int:
    return tokens_per_step * MEL_FRAMES_PER_TOKEN
