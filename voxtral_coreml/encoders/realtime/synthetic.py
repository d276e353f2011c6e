"""Synthetic Voxtral Realtime checkpoints in transformers' on-disk layout (random weights, real structure).

The config is transformers' own `VoxtralRealtimeConfig` serialized, so `from_pretrained` reads it; a small
language model stand-in sits around the audio tower so that extraction has tensors to skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from voxtral_coreml.sources.safetensors_io import TensorSpec, write_safetensors
from voxtral_coreml.sources.synthetic import DTYPE, audio_tensor

from .dims import RealtimeDims
from .layouts import MISTRAL_PREFIX, mistral_name, rope_rows_to_mistral
from .reference import reference_config

LM_TENSORS = {"language_model.model.embed_tokens.weight": (64, 8), "language_model.model.norm.weight": (8,)}


# Realtime names that take the 2507 generator's special values: norm gains, the residual's outlier channels.
ALIASES = {
    "audio_tower.norm.weight": "audio_tower.layer_norm.weight",
    "audio_tower.embedder.conv2.bias": "audio_tower.conv2.bias",
}


def realtime_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """2507's trained-looking values (RMSNorm gains as its LayerNorm gains)."""
    return audio_tensor(ALIASES.get(name, name), shape, seed)


def hf_config(dims: RealtimeDims) -> dict[str, object]:
    config = reference_config(dims).to_dict()
    config["architectures"] = ["VoxtralRealtimeForConditionalGeneration"]
    for key in ("_attn_implementation_autoset", "transformers_version"):
        config.pop(key, None)
    return config


def write_realtime_checkpoint(out_dir: Path, dims: RealtimeDims, seed: int) -> None:
    """config.json + model.safetensors (bf16) in `out_dir` (which must exist)."""
    shapes = {**dims.tensor_shapes(), **LM_TENSORS}
    specs = [TensorSpec(n, DTYPE, s) for n, s in shapes.items()]

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name.startswith("language_model."):
            return torch.full(spec.shape, 0.01, dtype=DTYPE)
        return realtime_tensor(spec.name, spec.shape, seed).to(DTYPE)

    write_safetensors(out_dir / "model.safetensors", specs, produce, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(dims), indent=2, sort_keys=True) + "\n")


def write_realtime_mistral_checkpoint(out_dir: Path, dims: RealtimeDims, seed: int) -> None:
    """The same weights as Mistral stores them: params.json + consolidated.safetensors, q/k rows interleaved."""
    canonical = dims.tensor_shapes()
    specs = [TensorSpec(mistral_name(n), DTYPE, s) for n, s in canonical.items()]
    by_mistral = {mistral_name(n): n for n in canonical}

    def produce(spec: TensorSpec) -> torch.Tensor:
        name = by_mistral[spec.name]
        w = realtime_tensor(name, spec.shape, seed).to(DTYPE)
        return rope_rows_to_mistral(w, dims.n_heads) if ".q_proj." in name or ".k_proj." in name else w

    tok = TensorSpec(f"{MISTRAL_PREFIX}tok_embeddings.weight", DTYPE, (64, dims.hidden_size))
    write_safetensors(
        out_dir / "consolidated.safetensors",
        [*specs, tok],
        lambda s: produce(s) if s is not tok else torch.zeros(s.shape, dtype=DTYPE),
    )
    encoder = {
        "dim": dims.d_model, "n_layers": dims.n_layers, "n_heads": dims.n_heads, "head_dim": dims.head_dim,
        "hidden_dim": dims.ffn_dim, "rope_theta": dims.rope_theta, "causal": True,
        "sliding_window": dims.sliding_window,
    }  # fmt: skip
    params = {
        "dim": dims.hidden_size,
        "multimodal": {"whisper_model_args": {"encoder_args": encoder, "downsample_args": {"downsample_factor": 4}}},
    }
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
