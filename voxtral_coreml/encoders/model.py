"""Voxtral's audio encoder + projector, laid out for the Apple Neural Engine. Read top to bottom.

The math is transformers' `VoxtralEncoder` + `VoxtralMultiModalProjector`; the layout follows Apple's
ml-ane-transformers: activations are (B, C, 1, S), the channel axis first, the sequence last.

    mel [1, 128, 3000] -> conv1, conv2 (stride 2) -> + positions -> N pre-LN layers -> LayerNorm
        -> projector (4 frames, time-major) -> audio_embeddings [1, 375, H]
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .attention import make_attention_core
from .dims import FRAMES_PER_EMBEDDING, POSITIONS_KEY, EncoderDims

LAYER_NORM_EPS = 1e-5


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions [length, channels]: the sin half, then the cos half. In float64 (stable.py): cast
    to fp16, bf16 or float32, they are the same on every machine (float32 math would round by instruction set)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float64))
    scaled_time = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def scalar_like(value: float, x: torch.Tensor) -> torch.Tensor:
    """A constant in x's dtype: coremltools promotes `fp16 tensor op Python float` to fp32."""
    return torch.full((), value, dtype=x.dtype)


class ChannelLayerNorm(nn.Module):
    """ANE: normalize over the channel axis (dim 1) of (B, C, 1, S) in place of transposing to (B, S, C)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        variance = (centered * centered).mean(dim=1, keepdim=True)
        normed = centered * torch.rsqrt(variance + scalar_like(LAYER_NORM_EPS, x))
        return normed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def pointwise(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    """ANE: a Linear as a 1x1 Conv2d, so (B, C, 1, S) needs no reshape around it."""
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)


class SelfAttention(nn.Module):
    def __init__(self, dims: EncoderDims, core: nn.Module) -> None:
        super().__init__()
        d = dims.d_model
        self.q_proj = pointwise(d, d)
        self.k_proj = pointwise(d, d, bias=False)  # Whisper's k_proj has no bias
        self.v_proj = pointwise(d, d)
        self.out_proj = pointwise(d, d)
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q_proj's weight and bias carry the 1/sqrt(head_dim) scale (ane_state_dict): transformers scales after the
        # bias, and (W x + b) s = (s W) x + s b
        return self.out_proj(self.core(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class EncoderLayer(nn.Module):
    def __init__(self, dims: EncoderDims, core: nn.Module) -> None:
        super().__init__()
        self.self_attn_layer_norm = ChannelLayerNorm(dims.d_model)
        self.self_attn = SelfAttention(dims, core)
        self.final_layer_norm = ChannelLayerNorm(dims.d_model)
        self.fc1 = pointwise(dims.d_model, dims.ffn_dim)
        self.fc2 = pointwise(dims.ffn_dim, dims.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class Projector(nn.Module):
    """Stacks 4 consecutive frames (time-major, like `reshape(-1, 4*d)`) and maps them to the LM width.

    ANE: the stacking is a (1, 4)-kernel, stride-4 conv whose weights are linear_1's columns rearranged,
    so no reshape of activations is needed.
    """

    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        k = FRAMES_PER_EMBEDDING
        self.linear_1 = nn.Conv2d(dims.d_model, dims.hidden_size, (1, k), stride=(1, k), bias=False)
        self.linear_2 = pointwise(dims.hidden_size, dims.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class VoxtralEncoderANE(nn.Module):
    def __init__(self, dims: EncoderDims, attention: str, query_chunk: int | None = None) -> None:
        super().__init__()
        d = dims.d_model
        self.dims = dims
        # ANE: Conv1d over time becomes Conv2d with a (1, k) kernel on (B, C, 1, T).
        self.conv1 = nn.Conv2d(dims.n_mels, d, (1, 3), padding=(0, 1))
        self.conv2 = nn.Conv2d(d, d, (1, 3), stride=(1, 2), padding=(0, 1))
        self.register_buffer("embed_positions", torch.zeros(1, d, 1, dims.n_positions))
        core = make_attention_core(attention, dims.n_heads, query_chunk)  # shared: it has no weights
        self.layers = nn.ModuleList(EncoderLayer(dims, core) for _ in range(dims.n_layers))
        self.layer_norm = ChannelLayerNorm(d)
        self.multi_modal_projector = Projector(dims)

    def forward(self, mel_spectrogram: torch.Tensor) -> torch.Tensor:
        x = self.stem(mel_spectrogram)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def stages(self) -> list:
        """stem, each layer, head as one-tensor functions: the sensitivity scan reruns from any of them."""
        return [self.stem, *self.layers, self.head]

    # stem and head are methods so that a caller can run the encoder from any layer on (sensitivity.py).
    def stem(self, mel_spectrogram: torch.Tensor) -> torch.Tensor:
        # [B, 128, 3000] -> (B, 128, 1, 3000), in the weights' dtype (fp16 when built for conversion)
        x = mel_spectrogram.unsqueeze(2).to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        return F.gelu(self.conv2(x)) + self.embed_positions

    def head(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.multi_modal_projector(self.layer_norm(x))  # (B, H, 1, 375)
        # [B, 375, H] float32 (the Swift app's contract) from fp16 or fp32 weights; float64 stays float64 (reference)
        return embeddings.squeeze(2).transpose(1, 2).to(torch.promote_types(embeddings.dtype, torch.float32))


def projector_conv_weight(linear_1: torch.Tensor, d_model: int) -> torch.Tensor:
    """linear_1 [H, 4*d] -> conv kernel [H, d, 1, 4] with K[h, c, 0, j] = W[h, j*d + c] (time-major)."""
    hidden = linear_1.shape[0]
    return linear_1.reshape(hidden, FRAMES_PER_EMBEDDING, d_model).permute(0, 2, 1).unsqueeze(2)


def ane_state_dict(weights: dict[str, torch.Tensor], dims: EncoderDims) -> dict[str, torch.Tensor]:
    """Canonical (HF) tensors -> this module's parameters: the only place their shapes change."""
    state: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if name == POSITIONS_KEY:
            continue
        key = name.removeprefix("audio_tower.")
        if ".q_proj." in name:
            w = w * dims.head_dim**-0.5  # softmax(q k^T * scale): the scale folded into q's weights and bias
        if name == "multi_modal_projector.linear_1.weight":
            w = projector_conv_weight(w, dims.d_model)
        elif w.dim() == 2:  # Linear [out, in] -> 1x1 conv [out, in, 1, 1]
            w = w[:, :, None, None]
        elif w.dim() == 3:  # Conv1d [out, in, k] -> Conv2d [out, in, 1, k]
            w = w[:, :, None, :]
        state[key] = w
    positions = weights.get(POSITIONS_KEY)
    if positions is None:
        positions = whisper_sinusoids(dims.n_positions, dims.d_model)
    state["embed_positions"] = positions.to(next(iter(weights.values())).dtype).t()[None, :, None, :]
    return state


def build_ane_encoder(
    weights: dict[str, torch.Tensor],
    dims: EncoderDims,
    attention: str,
    query_chunk: int | None = None,
) -> VoxtralEncoderANE:
    """The module with `weights` assigned in place: built on the meta device, so nothing is initialized
    at random and no weight is copied. `query_chunk` is for the `split_heads_chunked` core only."""
    with torch.device("meta"):
        model = VoxtralEncoderANE(dims, attention, query_chunk)
    model.load_state_dict(ane_state_dict(weights, dims), strict=True, assign=True)
    return model.eval().requires_grad_(False)
