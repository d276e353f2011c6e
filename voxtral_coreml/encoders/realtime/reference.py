"""transformers' own Voxtral Realtime modules, loaded with the same weights: the numeric reference.

Embeddings come from `VoxtralRealtimeForConditionalGeneration.get_audio_features`, whole-clip (offline) or
chunk by chunk with transformers' own `padding_cache` and `cache` (streaming). The language model stays on the
meta device: it is never allocated or run.
"""

from __future__ import annotations

import torch
from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

from .dims import MEL_FRAMES_PER_TOKEN, RealtimeDims


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
        # RoPE's inverse frequencies are a non-persistent buffer: computed, not loaded.
        rotary = inner.audio_tower.rotary_emb
        inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
        rotary.inv_freq = inv_freq
        rotary.original_inv_freq = inv_freq.clone()

    @torch.inference_mode()
    def audio_embeddings(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [1, M, T] (T a multiple of 8) -> [T/8, H], the whole clip in one call."""
        return self.model.get_audio_features(mel).pooler_output.reshape(-1, self.dims.hidden_size)

    @torch.inference_mode()
    def streaming_embeddings(self, mel: torch.Tensor, tokens_per_step: int) -> torch.Tensor:
        """The same clip fed `tokens_per_step` tokens (8 mel frames each) per call, with transformers' caches."""
        step = tokens_per_step * MEL_FRAMES_PER_TOKEN
        cache = padding_cache = None
        outputs = []
        for start in range(0, mel.shape[-1], step):
            out = self.model.get_audio_features(
                input_features=mel[..., start : start + step], padding_cache=padding_cache, cache=cache, use_cache=True
            )
            cache, padding_cache = out.cache, out.padding_cache
            outputs.append(out.pooler_output.reshape(-1, self.dims.hidden_size))
        return torch.cat(outputs)
