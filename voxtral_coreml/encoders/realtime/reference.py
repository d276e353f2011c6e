"""transformers' own Voxtral Realtime modules, loaded with the same weights: the numeric reference.

Embeddings come from `VoxtralRealtimeForConditionalGeneration.get_audio_features`, whole-clip (offline) or
chunk by chunk with transformers' own `padding_cache` and `cache` (streaming). The language model stays on the
meta device: it is never allocated or run.

transformers computes three parts in float32 whatever the input's dtype: RMSNorm, RoPE's angles and cos/sin, and
the attention softmax. float32 sums, exp and sin round differently by instruction set (AVX-512, AVX2, none), so a
float64 forward gave other embeddings on another CPU (a DVC output, stable.py). `in_input_dtype` runs those three
parts in the input's dtype: the same math, float64 throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration
from transformers.models.voxtral_realtime import modeling_voxtral_realtime as modeling

from .dims import MEL_FRAMES_PER_TOKEN, RealtimeDims
from .rope import inv_freq


def _rms_norm(self: modeling.VoxtralRealtimeRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary(self: modeling.VoxtralRealtimeRotaryEmbedding, x: torch.Tensor, position_ids: torch.Tensor):
    freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(device=x.device, dtype=x.dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


_SOFTMAX = nn.functional.softmax


def _softmax(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None, **kwargs) -> torch.Tensor:
    """eager attention's `softmax(..., dtype=torch.float32)`, in x's dtype when x is float64."""
    return _SOFTMAX(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)


@contextlib.contextmanager
def in_input_dtype() -> Iterator[None]:
    """transformers' Realtime modules with their float32 parts in the input's dtype (module docstring)."""
    patches = [
        (modeling.VoxtralRealtimeRMSNorm, "forward", _rms_norm),
        (modeling.VoxtralRealtimeRotaryEmbedding, "forward", _rotary),
        (nn.functional, "softmax", _softmax),  # eager_attention_forward's, only while the reference runs
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def reference_config(dims: RealtimeDims) -> VoxtralRealtimeConfig:
    config = VoxtralRealtimeConfig(
        audio_config={
            "hidden_size": dims.d_model,
            "intermediate_size": dims.ffn_dim,
            "num_hidden_layers": dims.n_layers,
            "num_attention_heads": dims.n_heads,
            "head_dim": dims.head_dim,
            "num_mel_bins": dims.n_mels,
            "sliding_window": dims.sliding_window,
            "rope_parameters": {"rope_type": "default", "rope_theta": dims.rope_theta},
        },
        # A one-layer stand-in of the right width: only its hidden_size (the projector's H) matters.
        text_config={
            "hidden_size": dims.hidden_size,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "vocab_size": 8,
        },
    )
    config._attn_implementation = "eager"  # the literal matmul-softmax-matmul
    config.audio_config._attn_implementation = "eager"
    return config


class RealtimeReference:
    def __init__(self, weights: dict[str, torch.Tensor], dims: RealtimeDims) -> None:
        with torch.device("meta"):
            model = VoxtralRealtimeForConditionalGeneration(reference_config(dims))
        self.model = model.eval().requires_grad_(False)
        self.dims = dims
        inner = self.model.model
        for module, prefix in (
            (inner.audio_tower, "audio_tower."),
            (inner.multi_modal_projector, "multi_modal_projector."),
        ):
            part = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
            module.load_state_dict(part, strict=False, assign=True)
        # RoPE's inverse frequencies are a non-persistent buffer: computed, not loaded (rope.py: on any CPU the same)
        rotary = inner.audio_tower.rotary_emb
        rotary.inv_freq = inv_freq(dims)
        rotary.original_inv_freq = rotary.inv_freq.clone()

    @torch.inference_mode()
    def audio_embeddings(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [1, M, T] (T a multiple of 8) -> [T/8, H], the whole clip in one call."""
        with in_input_dtype():
            return self.model.get_audio_features(mel).pooler_output.reshape(-1, self.dims.hidden_size)

    @torch.inference_mode()
    def streaming_embeddings(self, mel: torch.Tensor, tokens_per_step: int) -> torch.Tensor:
        """The same clip fed `tokens_per_step` tokens (8 mel frames each) per call, with transformers' caches."""
        step = tokens_per_step * MEL_FRAMES_PER_TOKEN
        cache = padding_cache = None
        outputs = []
        with in_input_dtype():
            for start in range(0, mel.shape[-1], step):
                out = self.model.get_audio_features(
                    input_features=mel[..., start : start + step],
                    padding_cache=padding_cache,
                    cache=cache,
                    use_cache=True,
                )
                cache, padding_cache = out.cache, out.padding_cache
                outputs.append(out.pooler_output.reshape(-1, self.dims.hidden_size))
        return torch.cat(outputs)
