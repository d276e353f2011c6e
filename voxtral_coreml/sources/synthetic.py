"""Synthetic Voxtral checkpoints in the real Hugging Face on-disk layout (random weights, real structure).

They stand in for the real models where the Hub cannot be reached: bf16 shards with an index, a language
model whose tensors surround the audio tower so that the tower crosses a shard boundary, and weights
scaled so activations look like a trained model's (LayerNorm gains near 1, a few outlier channels).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from voxtral_coreml.encoders.dims import POSITIONS_KEY, EncoderDims, canonical_tensor_shapes
from voxtral_coreml.encoders.model import whisper_sinusoids

from .safetensors_io import TensorSpec, write_safetensors

DTYPE = torch.bfloat16  # what the published checkpoints hold
OUTLIER_EVERY = 97  # one channel in ~100 carries a large gain, as trained transformers' residuals do


@dataclass(frozen=True)
class LanguageModelShape:
    """Only the bulk and names matter: these tensors exist to be skipped by extraction."""

    layers: int
    intermediate: int
    vocab: int
    shards: int


def lm_tensor_shapes(hidden: int, lm: LanguageModelShape) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (lm.vocab, hidden)}
    for i in range(lm.layers):
        p = f"language_model.model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (lm.intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (lm.intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, lm.intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["language_model.model.norm.weight"] = (hidden,)
    shapes["language_model.lm_head.weight"] = (lm.vocab, hidden)
    return shapes


def _generator(seed: int, name: str) -> torch.Generator:
    # Seeded per tensor name, so a tensor's values do not depend on which shard it lands in.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def audio_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A trained-looking value for one audio tower or projector tensor, in fp32."""
    g = _generator(seed, name)
    if name.endswith("layer_norm.weight"):
        gain = 1.0 + 0.05 * torch.randn(shape, generator=g)
        gain[::OUTLIER_EVERY] *= 6.0
        return gain
    if name.endswith(".bias"):
        bias = 0.02 * torch.randn(shape, generator=g)
        if name == "audio_tower.conv2.bias":
            bias[::OUTLIER_EVERY] = 3.0  # outlier channels in the residual stream
        return bias
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def _lm_tensor(spec: TensorSpec) -> torch.Tensor:
    # Never read by extraction; a cheap constant fill keeps generation of large repos fast.
    return torch.full(spec.shape, 0.01, dtype=DTYPE)


def hf_config(dims: EncoderDims, lm: LanguageModelShape) -> dict[str, object]:
    return {
        "architectures": ["VoxtralForConditionalGeneration"],
        "model_type": "voxtral",
        "audio_token_id": 24,
        "projector_hidden_act": "gelu",
        "torch_dtype": "bfloat16",
        "audio_config": {
            "model_type": "voxtral_encoder",
            "hidden_size": dims.d_model,
            "intermediate_size": dims.ffn_dim,
            "num_hidden_layers": dims.n_layers,
            "num_attention_heads": dims.n_heads,
            "head_dim": dims.head_dim,
            "num_mel_bins": dims.n_mels,
            "max_source_positions": dims.n_positions,
            "activation_function": "gelu",
            "scale_embedding": False,
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": dims.hidden_size,
            "intermediate_size": lm.intermediate,
            "num_hidden_layers": lm.layers,
            "vocab_size": lm.vocab,
        },
    }


PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 30,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "dither": 0.0,
    "return_attention_mask": False,
}


def _shard_plan(audio: list[TensorSpec], lm: list[TensorSpec], n_shards: int) -> list[list[TensorSpec]]:
    """LM tensors before and after the audio tower, with a shard boundary inside the tower."""
    if n_shards < 2:
        raise ValueError("synthetic checkpoints need at least 2 shards for the tower to cross a boundary")
    lm_groups = [lm[i::n_shards] for i in range(n_shards)]
    half = len(audio) // 2
    plan = [lm_groups[0] + audio[:half], audio[half:] + lm_groups[1]]
    return plan + lm_groups[2:]


def write_synthetic_checkpoint(out_dir: Path, dims: EncoderDims, lm: LanguageModelShape, seed: int) -> None:
    """Write config, preprocessor config, shards and index into `out_dir` (which must exist)."""
    audio_shapes = {POSITIONS_KEY: (dims.n_positions, dims.d_model), **canonical_tensor_shapes(dims)}
    audio = [TensorSpec(n, DTYPE, s) for n, s in audio_shapes.items()]
    lm_specs = [TensorSpec(n, DTYPE, s) for n, s in lm_tensor_shapes(dims.hidden_size, lm).items()]
    plan = _shard_plan(audio, lm_specs, lm.shards)

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name == POSITIONS_KEY:
            return whisper_sinusoids(dims.n_positions, dims.d_model).to(DTYPE)
        if spec.name.startswith("language_model."):
            return _lm_tensor(spec)
        return audio_tensor(spec.name, spec.shape, seed).to(DTYPE)

    weight_map: dict[str, str] = {}
    for k, specs in enumerate(plan, start=1):
        shard = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        write_safetensors(out_dir / shard, specs, produce, metadata={"format": "pt"})
        weight_map.update({s.name: shard for s in specs})
    total = sum(s.nbytes for s in audio + lm_specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(hf_config(dims, lm), indent=2) + "\n")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
