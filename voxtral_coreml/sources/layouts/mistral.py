"""Mistral's own layout: consolidated.safetensors + params.json, audio tensors under `mm_whisper_embeddings.`.

The Hub fetcher writes the same tensors, with their original names, to model.safetensors beside params.json.
Names as in transformers' convert_voxtral_weights_to_hf.py and vLLM's Voxtral loader. No positional
weights (they are computed sinusoids); no RoPE permutation on audio weights, so tensors are used as stored.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from voxtral_coreml.encoders.dims import FRAMES_PER_EMBEDDING, MEL_BINS, EncoderDims
from voxtral_coreml.pipeline.errors import VoxtralError, read_json
from voxtral_coreml.sources.safetensors_io import read_header

from .base import (
    MISTRAL_PREFIX,
    Layout,
    SourceTensor,
    config_int,
    config_section,
    is_mistral_encoder_tensor,
    stored_tensor,
)

PARAMS = "params.json"
WEIGHT_FILES = ("consolidated.safetensors", "model.safetensors")  # Mistral's own; what the Hub fetcher writes
WHISPER_ARGS = ("multimodal", "whisper_model_args")
ENCODER_ARGS = "multimodal.whisper_model_args.encoder_args"

# Mistral name (after the prefix) <-> canonical name; {n} is a layer number, {p} weight or bias.
_ENCODER = "whisper_encoder.transformer.layers.{n}."
_CANONICAL = "audio_tower.layers.{n}."
RENAMES = (
    ("whisper_encoder.conv_layers.0.{p}", "audio_tower.conv1.{p}"),
    ("whisper_encoder.conv_layers.1.{p}", "audio_tower.conv2.{p}"),
    (_ENCODER + "attention.wq.{p}", _CANONICAL + "self_attn.q_proj.{p}"),
    (_ENCODER + "attention.wk.{p}", _CANONICAL + "self_attn.k_proj.{p}"),
    (_ENCODER + "attention.wv.{p}", _CANONICAL + "self_attn.v_proj.{p}"),
    (_ENCODER + "attention.wo.{p}", _CANONICAL + "self_attn.out_proj.{p}"),
    (_ENCODER + "attention_norm.{p}", _CANONICAL + "self_attn_layer_norm.{p}"),
    (_ENCODER + "feed_forward.w1.{p}", _CANONICAL + "fc1.{p}"),
    (_ENCODER + "feed_forward.w2.{p}", _CANONICAL + "fc2.{p}"),
    (_ENCODER + "ffn_norm.{p}", _CANONICAL + "final_layer_norm.{p}"),
    ("whisper_encoder.transformer.norm.{p}", "audio_tower.layer_norm.{p}"),
    ("audio_language_projection.0.{p}", "multi_modal_projector.linear_1.{p}"),
    ("audio_language_projection.2.{p}", "multi_modal_projector.linear_2.{p}"),
)
_FIELDS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>weight|bias)"}


@cache
def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template)
    for field, group in _FIELDS.items():
        escaped = escaped.replace(re.escape(f"{{{field}}}"), group)
    return re.compile(escaped)


def _rename(name: str, side: int, renames: tuple[tuple[str, str], ...] = RENAMES) -> str | None:
    """Map `name` from one side of `renames` (0: Mistral, 1: canonical) to the other; None if nothing matches."""
    for pair in renames:
        if match := _pattern(pair[side]).fullmatch(name):
            return pair[1 - side].format(**match.groupdict())
    return None


def canonical_name(mistral: str) -> str | None:
    return _rename(mistral.removeprefix(MISTRAL_PREFIX), 0) if mistral.startswith(MISTRAL_PREFIX) else None


def mistral_name(canonical: str) -> str | None:
    renamed = _rename(canonical, 1)
    return None if renamed is None else MISTRAL_PREFIX + renamed


class MistralLayout(Layout):
    name = "mistral"

    @staticmethod
    def detect(root: Path) -> bool:
        weights = _weights_file(root)
        if weights is None or not (root / PARAMS).is_file():
            return False
        return any(map(is_mistral_encoder_tensor, read_header(weights)))

    def dims(self) -> EncoderDims:
        path = self.root / PARAMS
        params = read_json(path)
        encoder = _encoder_args(params, path)
        where = f"{path}: {ENCODER_ARGS}"
        dims = EncoderDims(
            d_model=config_int(encoder, ("dim",), where),
            n_layers=config_int(encoder, ("n_layers",), where),
            n_heads=config_int(encoder, ("n_heads",), where),
            ffn_dim=config_int(encoder, ("hidden_dim",), where),
            hidden_size=config_int(params, ("dim",), str(path)),  # the projector's output is the text model's width
            n_mels=_mel_bins(encoder, where),
        )
        if encoder.get("head_dim", dims.head_dim) != dims.head_dim:
            raise VoxtralError(f"{where}: head_dim {encoder['head_dim']} is not dim / n_heads = {dims.head_dim}")
        return dims

    def tensors(self) -> dict[str, SourceTensor]:
        path = _weights_file(self.root)
        if path is None:
            raise VoxtralError(f"{self.root}: no {' or '.join(WEIGHT_FILES)}")
        found: dict[str, SourceTensor] = {}
        for stored, info in read_header(path).items():
            if not is_mistral_encoder_tensor(stored):
                continue
            name = canonical_name(stored)
            if name is None:
                raise VoxtralError(f"{path}: tensor '{stored}' is not part of a Voxtral audio encoder")
            found[name] = stored_tensor(name, path, info)
        return found

    def source_name(self, canonical: str) -> str:
        return mistral_name(canonical) or canonical


def _weights_file(root: Path) -> Path | None:
    return next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)


def _encoder_args(params: dict, path: Path) -> dict:
    """params.json's encoder arguments, refused unless they describe Voxtral's (non-causal, 4x) encoder."""
    encoder = config_section(params, (*WHISPER_ARGS, "encoder_args"), path)
    if encoder.get("causal", False) or encoder.get("pos_embed", "sinusoidal") != "sinusoidal":
        raise VoxtralError(f"{path}: {ENCODER_ARGS} describe a causal (Voxtral Realtime) encoder, not supported")
    downsample = config_section(params, (*WHISPER_ARGS, "downsample_args"), path)
    factor = config_int(downsample, ("downsample_factor",), f"{path}: {'.'.join(WHISPER_ARGS)}.downsample_args")
    if factor != FRAMES_PER_EMBEDDING:
        raise VoxtralError(
            f"{path}: downsample_factor is {factor}; Voxtral's projector stacks {FRAMES_PER_EMBEDDING} frames"
        )
    return encoder


def _mel_bins(encoder: dict, where: str) -> int:
    audio = encoder.get("audio_encoding_args")
    if not isinstance(audio, dict) or "num_mel_bins" not in audio:
        return MEL_BINS
    return config_int(audio, ("num_mel_bins",), f"{where}.audio_encoding_args")
