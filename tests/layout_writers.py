"""The synthetic checkpoint's weights (synthetic.audio_tensor) written in Mistral's and MLX's layouts.

The HF layout is synthetic.py's own. MLX checkpoints are written by MLX itself (mlx.core.quantize and
mlx.core.save_safetensors), the way mlx-lm's save_model and save_config lay them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from safetensors.torch import save_file

from voxtral_coreml.encoders.dims import CONV_WEIGHTS, POSITIONS_KEY, EncoderDims, canonical_tensor_shapes
from voxtral_coreml.encoders.model import whisper_sinusoids
from voxtral_coreml.sources.layouts.mistral import mistral_name
from voxtral_coreml.sources.synthetic import DTYPE, LanguageModelShape, audio_tensor, hf_config

TORCH_TO_MX = {torch.bfloat16: mx.bfloat16, torch.float16: mx.float16, torch.float32: mx.float32}


def canonical_weights(dims: EncoderDims, seed: int, dtype: torch.dtype = DTYPE) -> dict[str, torch.Tensor]:
    """Exactly what write_synthetic_checkpoint stores for the audio tower and projector (positions included)."""
    weights = {name: audio_tensor(name, shape, seed).to(dtype) for name, shape in canonical_tensor_shapes(dims).items()}
    weights[POSITIONS_KEY] = whisper_sinusoids(dims.n_positions, dims.d_model).to(dtype)
    return weights


def _lm_weights(hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    return {
        "tok_embeddings.weight": torch.full((vocab, hidden), 0.01, dtype=DTYPE),
        "mm_whisper_embeddings.tok_embeddings.weight": torch.full((vocab, hidden), 0.02, dtype=DTYPE),
        "layers.0.attention.wq.weight": torch.full((hidden, hidden), 0.03, dtype=DTYPE),
        "norm.weight": torch.ones(hidden, dtype=DTYPE),
        "output.weight": torch.full((vocab, hidden), 0.04, dtype=DTYPE),
    }


def mistral_params(dims: EncoderDims, lm: LanguageModelShape) -> dict:
    """params.json as Mistral publishes it: the text model at the top, the encoder under multimodal."""
    return {
        "dim": dims.hidden_size,
        "n_layers": lm.layers,
        "head_dim": dims.hidden_size // 4,
        "hidden_dim": lm.intermediate,
        "n_heads": 4,
        "n_kv_heads": 2,
        "rope_theta": 100000000.0,
        "norm_eps": 1e-05,
        "vocab_size": lm.vocab,
        "max_seq_len": 32768,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": 16000,
                        "frame_rate": 12.5,
                        "num_mel_bins": dims.n_mels,
                        "hop_length": 160,
                        "window_size": 400,
                    },
                    "dim": dims.d_model,
                    "n_layers": dims.n_layers,
                    "head_dim": dims.head_dim,
                    "hidden_dim": dims.ffn_dim,
                    "n_heads": dims.n_heads,
                    "vocab_size": 51866,
                    "max_source_positions": dims.n_positions,
                },
                "downsample_args": {"downsample_factor": 4},
            }
        },
    }


def write_mistral_checkpoint(
    root: Path, dims: EncoderDims, lm: LanguageModelShape, seed: int = 1, weights_file: str = "consolidated.safetensors"
) -> Path:
    """consolidated.safetensors (LM + mm_whisper_embeddings.*, no positions) and params.json."""
    root.mkdir(parents=True, exist_ok=True)
    audio = {mistral_name(n): t for n, t in canonical_weights(dims, seed).items() if n != POSITIONS_KEY}
    save_file({**_lm_weights(dims.hidden_size, lm.vocab), **audio}, root / weights_file)
    (root / "params.json").write_text(json.dumps(mistral_params(dims, lm), indent=2))
    return root


@dataclass(frozen=True)
class MLXQuant:
    """How to quantize, as mlx-lm's quantize_model records it in config.json."""

    bits: int = 4
    group_size: int = 64
    overrides: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (bits, group_size)
    positions: bool = False  # mlx.voxtral leaves embed_positions alone; plain mlx-lm would quantize them

    def params(self, module: str) -> tuple[int, int]:
        return self.overrides.get(module, (self.bits, self.group_size))

    def config(self) -> dict:
        section: dict = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        for module, (bits, group_size) in self.overrides.items():
            section[module] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        return section


def _quantizable(name: str, shape: tuple[int, ...], quant: MLXQuant) -> bool:
    """What nn.quantize would replace: Linear and Embedding weights whose rows split into whole groups."""
    if name == POSITIONS_KEY:
        return quant.positions
    linear = len(shape) == 2 and name.endswith(".weight") and "layer_norm" not in name
    return linear and shape[1] % quant.params(name.removesuffix(".weight"))[1] == 0


def mx_to_torch(array: mx.array, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(array.astype(mx.float32))).to(dtype)  # exact: every dtype here fits fp32


def write_mlx_checkpoint(
    root: Path,
    dims: EncoderDims,
    lm: LanguageModelShape,
    seed: int = 1,
    dtype: torch.dtype = DTYPE,
    quant: MLXQuant | None = None,
) -> dict[str, torch.Tensor]:
    """An MLX conversion of the synthetic checkpoint; returns the canonical tensors it should extract to
    (for quantized modules: mlx.core.dequantize of what mlx.core.quantize stored)."""
    root.mkdir(parents=True, exist_ok=True)
    stored: dict[str, mx.array] = {}
    expected: dict[str, torch.Tensor] = {}
    lm_weights = {
        "language_model.model.embed_tokens.weight": torch.full((lm.vocab, dims.hidden_size), 0.01),
        "language_model.lm_head.weight": torch.full((lm.vocab, dims.hidden_size), 0.02),
    }
    for name, tensor in {**canonical_weights(dims, seed, dtype), **lm_weights}.items():
        array = mx.array(tensor.float().numpy()).astype(TORCH_TO_MX[dtype])
        if name in CONV_WEIGHTS:
            array = array.transpose(0, 2, 1)
        if quant is None or not _quantizable(name, tuple(tensor.shape), quant):
            stored[name] = array
            expected[name] = tensor.to(dtype)
            continue
        module = name.removesuffix(".weight")
        bits, group_size = quant.params(module)
        packed, scales, biases = mx.quantize(array, group_size=group_size, bits=bits)
        stored |= {name: packed, f"{module}.scales": scales, f"{module}.biases": biases}
        expected[name] = mx_to_torch(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits), dtype)
    mx.save_safetensors(str(root / "model.safetensors"), stored, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(sorted(stored), "model.safetensors")}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    config = hf_config(dims, lm)
    if quant is not None:
        config["quantization"] = config["quantization_config"] = quant.config()
    (root / "config.json").write_text(json.dumps(config, indent=4))
    return {name: t for name, t in expected.items() if not name.startswith("language_model.")}
