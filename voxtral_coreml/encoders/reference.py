"""transformers' own Voxtral feature extraction and modules, loaded with the same weights: the numeric reference.

Features come from WhisperFeatureExtractor configured as Voxtral's and called with VoxtralProcessor's own
audio arguments. The embeddings go through `VoxtralForConditionalGeneration.get_audio_features`, so the
projector's frame grouping is transformers' code, not a copy of ours. The language model stays on the meta
device: it is never allocated or run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from transformers import VoxtralConfig, VoxtralForConditionalGeneration, VoxtralProcessor, WhisperFeatureExtractor

from voxtral_coreml.features.logmel import speech_mel
from voxtral_coreml.numerics.metrics import compare_embeddings
from voxtral_coreml.numerics.stable import FLOAT64_RESOLUTION_DB, float64, stored_float32
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted
from voxtral_coreml.sources.safetensors_io import TensorSpec, write_safetensors
from voxtral_coreml.sources.synthetic import PREPROCESSOR_CONFIG

from .dims import MEL_BINS, POSITIONS_KEY, EncoderDims
from .model import build_ane_encoder, whisper_sinusoids

log = logging.getLogger(__name__)


def processor_features(audio: np.ndarray, n_mels: int = MEL_BINS) -> torch.Tensor:
    """Mono 16 kHz samples -> [N, n_mels, 3000], as VoxtralProcessor's `_retrieve_input_features` computes them."""
    config = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k != "feature_extractor_type"}
    config["feature_size"] = n_mels
    extractor = WhisperFeatureExtractor(**config)
    kwargs = dict(VoxtralProcessor.audio_kwargs)  # pad to a multiple of 30 s, no truncation, torch tensors
    frames = kwargs.pop("max_source_positions")
    features = extractor(audio, **kwargs)["input_features"]
    return features.reshape(extractor.feature_size, -1, frames).transpose(0, 1)


def reference_config(dims: EncoderDims) -> VoxtralConfig:
    config = VoxtralConfig(
        audio_config={
            "hidden_size": dims.d_model,
            "intermediate_size": dims.projector_in,  # transformers reshapes by this size in get_audio_features
            "num_hidden_layers": dims.n_layers,
            "num_attention_heads": dims.n_heads,
            "num_mel_bins": dims.n_mels,
            "max_source_positions": dims.n_positions,
        },
        # A one-layer stand-in of the right width: only its hidden_size (the projector's H) matters.
        text_config={
            "hidden_size": dims.hidden_size,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_dim": dims.hidden_size,
            "vocab_size": 8,
        },
    )
    config._attn_implementation = "eager"  # the literal matmul-softmax-matmul
    config.audio_config._attn_implementation = "eager"
    return config


class TransformersReference:
    def __init__(self, weights: dict[str, torch.Tensor], dims: EncoderDims) -> None:
        if dims.ffn_dim != dims.projector_in:
            # transformers' get_audio_features reshapes by intermediate_size, i.e. it assumes ffn = 4 * d.
            raise ValueError(f"the reference needs ffn_dim == 4 * d_model, got {dims.ffn_dim}")
        with torch.device("meta"):
            model = VoxtralForConditionalGeneration(reference_config(dims))
        self.model = model.eval().requires_grad_(False)
        inner = self.model.model
        dtype = next(iter(weights.values())).dtype
        positions = weights.get(POSITIONS_KEY, whisper_sinusoids(dims.n_positions, dims.d_model).to(dtype))
        tower = {k.removeprefix("audio_tower."): v for k, v in weights.items() if k.startswith("audio_tower.")}
        tower["embed_positions.weight"] = positions
        inner.audio_tower.load_state_dict(tower, strict=True, assign=True)
        projector = {
            k.removeprefix("multi_modal_projector."): v
            for k, v in weights.items()
            if k.startswith("multi_modal_projector.")
        }
        inner.multi_modal_projector.load_state_dict(projector, strict=True, assign=True)

    @torch.inference_mode()
    def audio_embeddings(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [N, n_mels, 3000] -> [N*375, H], exactly as Voxtral feeds the language model."""
        return self.model.get_audio_features(mel).pooler_output


def compute_reference(
    extracted_dir: str | os.PathLike[str], audio: str | os.PathLike[str] | None, attention: str, query_chunk: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """transformers' and the ANE module's embeddings on one speech window, and their parity.

    Both run in float64 on the stored (float32) mel, and their embeddings are stored as float32 (stable.py): a
    function of the weights and the audio alone, on any machine. The parity is measured in float64, up to
    FLOAT64_RESOLUTION_DB: the same math agrees beyond it, a layout bug falls far below."""
    weights, dims, _ = load_extracted(extracted_dir)
    weights = {name: float64(w) for name, w in weights.items()}
    mel = speech_mel(audio, dims.n_mels)
    log.info("reference: transformers forward in float64 (%d layers, d_model %d)", dims.n_layers, dims.d_model)
    expected = TransformersReference(weights, dims).audio_embeddings(float64(mel))
    log.info("reference: ANE module forward in float64")
    with torch.inference_mode():
        ane = build_ane_encoder(weights, dims, attention, query_chunk)(float64(mel)).reshape(expected.shape)
    tensors = {"mel": mel.contiguous(), "transformers": stored_float32(expected), "ane_module": stored_float32(ane)}
    return tensors, compare_embeddings(expected, ane, resolution_db=FLOAT64_RESOLUTION_DB)


def check_parity(model: str, parity: dict[str, float], gate_db: float) -> None:
    """In float64 the ANE module matches transformers far above `build.parity_gate_db`; a layout bug falls below."""
    if parity["psnr_db"] < gate_db:
        raise VoxtralError(
            f"{model}: the ANE module differs from transformers: PSNR {parity['psnr_db']} dB "
            f"< build.parity_gate_db {gate_db} dB"
        )


def save_reference(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    write_safetensors(path, specs, lambda spec: tensors[spec.name])
