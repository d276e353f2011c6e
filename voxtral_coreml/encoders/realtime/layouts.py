"""Realtime checkpoint layouts, each mapped to the canonical (HF) tensor names and shapes.

- hf: transformers' `config.json` (model_type voxtral_realtime) + model.safetensors[.index.json], names
  `audio_tower.embedder.conv{1,2}`, `audio_tower.layers.N.{self_attn,mlp}.*`, `audio_tower.norm`.
- mistral: `params.json` + consolidated.safetensors, names under
  `mm_streams_embeddings.embedding_module.`; q/k rows are interleaved per head there (Mistral's RoPE) and
  permuted here as transformers' convert_voxtral_realtime_weights_to_hf.py does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from voxtral_coreml.pipeline.errors import VoxtralError, read_json
from voxtral_coreml.sources.layouts.base import (
    REALTIME_MISTRAL_PREFIX,
    Layout,
    SourceTensor,
    config_int,
    config_section,
    stored_tensor,
)
from voxtral_coreml.sources.layouts.hf import CONFIG, audio_headers
from voxtral_coreml.sources.layouts.mistral import PARAMS, WEIGHT_FILES
from voxtral_coreml.sources.layouts.mistral import _rename as rename_by_table
from voxtral_coreml.sources.safetensors_io import read_header

from .dims import SLIDING_WINDOW, RealtimeDims

MODEL_TYPE = "voxtral_realtime"
MISTRAL_PREFIX = REALTIME_MISTRAL_PREFIX
ENCODER_ARGS = ("multimodal", "whisper_model_args", "encoder_args")

_ENCODER = "whisper_encoder.transformer.layers.{n}."
_CANONICAL = "audio_tower.layers.{n}."
RENAMES = (
    ("whisper_encoder.conv_layers.0.conv.{p}", "audio_tower.embedder.conv1.{p}"),
    ("whisper_encoder.conv_layers.1.conv.{p}", "audio_tower.embedder.conv2.{p}"),
    (_ENCODER + "attention.wq.{p}", _CANONICAL + "self_attn.q_proj.{p}"),
    (_ENCODER + "attention.wk.{p}", _CANONICAL + "self_attn.k_proj.{p}"),
    (_ENCODER + "attention.wv.{p}", _CANONICAL + "self_attn.v_proj.{p}"),
    (_ENCODER + "attention.wo.{p}", _CANONICAL + "self_attn.o_proj.{p}"),
    (_ENCODER + "attention_norm.{p}", _CANONICAL + "self_attn_layer_norm.{p}"),
    (_ENCODER + "feed_forward.w1.{p}", _CANONICAL + "mlp.gate_proj.{p}"),
    (_ENCODER + "feed_forward.w2.{p}", _CANONICAL + "mlp.down_proj.{p}"),
    (_ENCODER + "feed_forward.w3.{p}", _CANONICAL + "mlp.up_proj.{p}"),
    (_ENCODER + "ffn_norm.{p}", _CANONICAL + "final_layer_norm.{p}"),
    ("whisper_encoder.transformer.norm.{p}", "audio_tower.norm.{p}"),
    ("audio_language_projection.0.{p}", "multi_modal_projector.linear_1.{p}"),
    ("audio_language_projection.2.{p}", "multi_modal_projector.linear_2.{p}"),
)


def _rename(name: str, side: int) -> str | None:
    return rename_by_table(name, side, RENAMES)


def mistral_name(canonical: str) -> str | None:
    renamed = _rename(canonical, 1)
    return None if renamed is None else MISTRAL_PREFIX + renamed


def is_realtime_hf(root: Path) -> bool:
    config = root / CONFIG
    return config.is_file() and read_json(config).get("model_type") == MODEL_TYPE


def mistral_weights(root: Path) -> Path | None:
    return next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)


def is_realtime_mistral(root: Path) -> bool:
    weights = mistral_weights(root)
    return weights is not None and any(n.startswith(MISTRAL_PREFIX) for n in read_header(weights))


def rope_rows_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral's interleaved rotary pairs -> transformers' halves, per head (rows of a q/k weight or bias)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_rows_to_mistral(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class RealtimeHFLayout(Layout):
    name = "hf"

    @staticmethod
    def detect(root: Path) -> bool:
        return is_realtime_hf(root) and bool(audio_headers(root))

    def dims(self) -> RealtimeDims:
        path = self.root / CONFIG
        config = read_json(path)
        audio = config_section(config, ("audio_config",), path)
        text = config_section(config, ("text_config",), path)
        where = f"{path}: audio_config"
        rope = config_section(audio, ("rope_parameters",), f"{where}")
        theta = rope.get("rope_theta")
        if not isinstance(theta, int | float) or isinstance(theta, bool):
            raise VoxtralError(f"{where}.rope_parameters: 'rope_theta' must be a number, got {theta!r}")
        return RealtimeDims(
            d_model=config_int(audio, ("hidden_size",), where),
            n_layers=config_int(audio, ("num_hidden_layers",), where),
            n_heads=config_int(audio, ("num_attention_heads",), where),
            head_dim=config_int(audio, ("head_dim",), where),
            ffn_dim=config_int(audio, ("intermediate_size",), where),
            hidden_size=config_int(text, ("hidden_size",), f"{path}: text_config"),
            rope_theta=float(theta),
            sliding_window=config_int(audio, ("sliding_window",), where),
            n_mels=config_int(audio, ("num_mel_bins",), where),
        )

    def tensors(self) -> dict[str, SourceTensor]:
        return {name: stored_tensor(name, path, info) for name, (path, info) in audio_headers(self.root).items()}


class RealtimeMistralLayout(Layout):
    name = "mistral"

    @staticmethod
    def detect(root: Path) -> bool:
        return is_realtime_mistral(root)

    def _params(self) -> tuple[Path, dict, dict]:
        path = self.root / PARAMS
        if not path.is_file():
            raise VoxtralError(
                f"{self.root}: tensors named {MISTRAL_PREFIX}* need Mistral's params.json beside them "
                "(a checkpoint renamed from the HF layout would keep transformers' RoPE row order: convert from "
                "the original instead)"
            )
        params = read_json(path)
        return path, params, config_section(params, ENCODER_ARGS, path)

    def dims(self) -> RealtimeDims:
        path, params, encoder = self._params()
        where = f"{path}: {'.'.join(ENCODER_ARGS)}"
        if not encoder.get("causal", False):
            raise VoxtralError(f"{where}: 'causal' is not true: this is a Voxtral 2507 encoder, not Realtime")
        theta = encoder.get("rope_theta")
        if not isinstance(theta, int | float) or isinstance(theta, bool):
            raise VoxtralError(f"{where}: 'rope_theta' must be a number, got {theta!r}")
        window = encoder.get("sliding_window", SLIDING_WINDOW)
        return RealtimeDims(
            d_model=config_int(encoder, ("dim",), where),
            n_layers=config_int(encoder, ("n_layers",), where),
            n_heads=config_int(encoder, ("n_heads",), where),
            head_dim=config_int(encoder, ("head_dim",), where),
            ffn_dim=config_int(encoder, ("hidden_dim",), where),
            hidden_size=config_int(params, ("dim",), str(path)),
            rope_theta=float(theta),
            sliding_window=int(window),
        )

    def tensors(self) -> dict[str, SourceTensor]:
        path = mistral_weights(self.root)
        n_heads = self.dims().n_heads
        found: dict[str, SourceTensor] = {}
        for stored, info in read_header(path).items():
            if not stored.startswith(MISTRAL_PREFIX) or ".tok_embeddings." in stored:
                continue
            name = _rename(stored.removeprefix(MISTRAL_PREFIX), 0)
            if name is None:
                raise VoxtralError(f"{path}: tensor '{stored}' is not part of a Voxtral Realtime audio encoder")
            tensor = stored_tensor(name, path, info)
            if ".q_proj." in name or ".k_proj." in name:
                load = tensor.load
                tensor = SourceTensor(
                    name, path, info.torch_dtype, info.shape, lambda load=load: rope_rows_to_hf(load(), n_heads)
                )
            found[name] = tensor
        return found

    def source_name(self, canonical: str) -> str:
        return mistral_name(canonical) or canonical


LAYOUTS: dict[str, type[Layout]] = {layout.name: layout for layout in (RealtimeHFLayout, RealtimeMistralLayout)}
