"""Whisper's trained text decoder (from the same CTranslate2 model.bin as the encoder) as a task-level check.

transformers' WhisperForConditionalGeneration with Whisper base's weights greedily decodes from given encoder
states; comparing the token ids decoded from a compressed encoder's states with those from the fp32 encoder's
tells whether compression changed what the model hears (no tokenizer is needed to compare ids).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from voxtral_coreml.pipeline.errors import VoxtralError

# <|startoftranscript|><|en|><|transcribe|><|notimestamps|> in the multilingual vocabulary.
ENGLISH_TRANSCRIBE_PROMPT = (50258, 50259, 50359, 50363)
END_OF_TEXT = 50257
MAX_NEW_TOKENS = 200
ATTENTION = {"linear_0": "q_proj", "linear_2": "out_proj"}  # cross-attention; linear_1 fuses k and v
LAYER = {"self_attention/layer_norm": "self_attn_layer_norm", "self_attention/linear_1": "self_attn.out_proj",
         "attention/layer_norm": "encoder_attn_layer_norm", "attention/linear_0": "encoder_attn.q_proj",
         "attention/linear_2": "encoder_attn.out_proj", "ffn/layer_norm": "final_layer_norm",
         "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}  # fmt: skip
PARAM = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}


def _t(ct2: dict[str, np.ndarray], name: str) -> torch.Tensor:
    if name not in ct2:
        raise VoxtralError(f"CTranslate2 model: decoder variable '{name}' is missing")
    return torch.from_numpy(ct2[name]).float()


def decoder_state_dict(ct2: dict[str, np.ndarray], n_layers: int) -> dict[str, torch.Tensor]:
    """CTranslate2 decoder names -> transformers' `model.decoder.*` (fused q/k/v and k/v split, k without bias)."""
    state = {
        "embed_tokens.weight": _t(ct2, "decoder/embeddings/weight"),
        "embed_positions.weight": _t(ct2, "decoder/position_encodings/encodings"),
        "layer_norm.weight": _t(ct2, "decoder/layer_norm/gamma"),
        "layer_norm.bias": _t(ct2, "decoder/layer_norm/beta"),
    }
    for i in range(n_layers):
        src, dst = f"decoder/layer_{i}/", f"layers.{i}."
        for ct2_name, hf_name in LAYER.items():
            for ct2_param, hf_param in PARAM.items():
                if f"{src}{ct2_name}/{ct2_param}" in ct2:
                    state[f"{dst}{hf_name}.{hf_param}"] = _t(ct2, f"{src}{ct2_name}/{ct2_param}")
        q, k, v = _t(ct2, src + "self_attention/linear_0/weight").chunk(3)
        qb, _, vb = _t(ct2, src + "self_attention/linear_0/bias").chunk(3)
        state.update({f"{dst}self_attn.q_proj.weight": q, f"{dst}self_attn.k_proj.weight": k})
        state.update({f"{dst}self_attn.v_proj.weight": v, f"{dst}self_attn.q_proj.bias": qb})
        state[f"{dst}self_attn.v_proj.bias"] = vb
        k, v = _t(ct2, src + "attention/linear_1/weight").chunk(2)
        _, vb = _t(ct2, src + "attention/linear_1/bias").chunk(2)
        state.update({f"{dst}encoder_attn.k_proj.weight": k, f"{dst}encoder_attn.v_proj.weight": v})
        state[f"{dst}encoder_attn.v_proj.bias"] = vb
    return state


class WhisperDecoder:
    """Greedy decoding from encoder states [1, 1500, d_model] with Whisper's trained decoder."""

    def __init__(self, ct2: dict[str, np.ndarray]) -> None:
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        embeddings = ct2["decoder/embeddings/weight"]
        n_layers = len({m.group(1) for n in ct2 if (m := re.match(r"decoder/layer_(\d+)/", n))})
        config = WhisperConfig(
            vocab_size=embeddings.shape[0],
            d_model=embeddings.shape[1],
            decoder_layers=n_layers,
            decoder_attention_heads=int(ct2["decoder/num_heads"].item()),
            decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
            max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
            encoder_layers=1,
            encoder_attention_heads=1,
        )
        model = WhisperForConditionalGeneration(config).eval().requires_grad_(False)
        model.model.decoder.load_state_dict(decoder_state_dict(ct2, n_layers), strict=True)
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out

    @torch.inference_mode()
    def greedy_batch(self, encoder_states: torch.Tensor, max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
        """Each clip's token ids after the prompt, up to (not including) end-of-text: encoder_states
        [N, 1500, d_model], decoded together (a finished clip's later tokens are dropped)."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        n = encoder_states.shape[0]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        tokens = torch.tensor([ENGLISH_TRANSCRIBE_PROMPT] * n)
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        for _ in range(max_new_tokens):
            hidden = self.decoder(
                input_ids=tokens, encoder_hidden_states=encoder_states.float(), past_key_values=cache, use_cache=True
            ).last_hidden_state
            tokens = self.proj_out(hidden[:, -1]).argmax(-1, keepdim=True)
            for i, token in enumerate(tokens[:, 0].tolist()):
                done[i] = done[i] or token == END_OF_TEXT
                if not done[i]:
                    out[i].append(token)
            if all(done):
                break
        return out


def token_agreement(reference: list[int], tokens: list[int]) -> float:
    """Share of the reference's token positions where `tokens` has the same id (1.0: identical transcripts)."""
    import difflib

    if not reference:
        return 1.0 if not tokens else 0.0
    matcher = difflib.SequenceMatcher(a=reference, b=tokens, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / max(len(reference), len(tokens))
