"""A Voxtral-layout (HF) checkpoint whose audio tower is a trained Whisper encoder from a CTranslate2 model.bin.

Whisper's encoder is Voxtral's audio tower at other sizes (conv stem, sinusoid positions, pre-LN layers, k without
bias); no Voxtral weights can be had here, so trained Whisper weights stand in for them, with a seeded random
projector to the language model's width. The model.bin comes from installed Python packages (their
`data/model.bin*` files, concatenated in the order configured): pinned in requirements.lock like any dependency.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from voxtral_coreml.encoders.dims import POSITIONS_KEY, EncoderDims, canonical_tensor_shapes
from voxtral_coreml.pipeline.errors import VoxtralError

from .ct2 import read_ct2_model
from .safetensors_io import TensorSpec, write_safetensors
from .synthetic import PREPROCESSOR_CONFIG, LanguageModelShape, audio_tensor, hf_config

PROJECTOR = ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight")
# CTranslate2 encoder name -> canonical name, per layer ({i}); q/k/v are fused in linear_0 and split below.
LAYER_NAMES = {
    "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
    "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
    "self_attention/linear_1/weight": "self_attn.out_proj.weight",
    "self_attention/linear_1/bias": "self_attn.out_proj.bias",
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
}
TOP_NAMES = {
    "encoder/conv1/weight": "audio_tower.conv1.weight",
    "encoder/conv1/bias": "audio_tower.conv1.bias",
    "encoder/conv2/weight": "audio_tower.conv2.weight",
    "encoder/conv2/bias": "audio_tower.conv2.bias",
    "encoder/layer_norm/gamma": "audio_tower.layer_norm.weight",
    "encoder/layer_norm/beta": "audio_tower.layer_norm.bias",
    "encoder/position_encodings/encodings": POSITIONS_KEY,
}
# The text model is not written (only its width matters); its config stays minimal.
NO_LANGUAGE_MODEL = LanguageModelShape(layers=0, intermediate=0, vocab=0, shards=1)


def installed_parts(packages: list[str]) -> list[Path]:
    """The `data/model.bin*` files of each installed package, in package order."""
    parts: list[Path] = []
    for package in packages:
        try:
            data = Path(str(resources.files(package) / "data"))
        except ModuleNotFoundError:
            raise VoxtralError(f"package {package!r} is not installed (it is pinned in requirements.lock)") from None
        found = sorted(data.glob("model.bin*"))
        if not found:
            raise VoxtralError(f"{data}: no model.bin* file in package {package!r}")
        parts.extend(found)
    return parts


def _get(ct2: dict[str, np.ndarray], name: str) -> torch.Tensor:
    if name not in ct2:
        raise VoxtralError(f"CTranslate2 model: variable '{name}' is missing (not a Whisper encoder?)")
    return torch.from_numpy(ct2[name])


def encoder_dims(ct2: dict[str, np.ndarray], hidden_size: int) -> EncoderDims:
    conv1 = _get(ct2, "encoder/conv1/weight")
    layers = {int(m.group(1)) for n in ct2 if (m := re.match(r"encoder/layer_(\d+)/", n))}
    return EncoderDims(
        d_model=conv1.shape[0],
        n_layers=len(layers),
        n_heads=int(_get(ct2, "encoder/num_heads").item()),
        ffn_dim=_get(ct2, "encoder/layer_0/ffn/linear_0/weight").shape[0],
        hidden_size=hidden_size,
        n_mels=conv1.shape[1],
    )


def encoder_tensors(ct2: dict[str, np.ndarray], dims: EncoderDims) -> dict[str, torch.Tensor]:
    """Canonical name -> the trained tensor (its stored dtype), positions included, projector excluded."""
    tensors = {canonical: _get(ct2, name) for name, canonical in TOP_NAMES.items()}
    for i in range(dims.n_layers):
        src, dst = f"encoder/layer_{i}/", f"audio_tower.layers.{i}."
        tensors.update({dst + canonical: _get(ct2, src + name) for name, canonical in LAYER_NAMES.items()})
        q, k, v = _get(ct2, src + "self_attention/linear_0/weight").chunk(3)
        q_bias, _, v_bias = _get(ct2, src + "self_attention/linear_0/bias").chunk(3)  # k's slice: unused zeros
        for proj, weight, bias in (("q", q, q_bias), ("k", k, None), ("v", v, v_bias)):
            tensors[f"{dst}self_attn.{proj}_proj.weight"] = weight.contiguous()
            if bias is not None:
                tensors[f"{dst}self_attn.{proj}_proj.bias"] = bias.contiguous()
    return tensors


def write_whisper_checkpoint(out_dir: Path, parts: list[Path], hidden_size: int, seed: int) -> EncoderDims:
    """config.json, preprocessor_config.json and model.safetensors (audio tower + seeded projector) in `out_dir`."""
    ct2 = read_ct2_model(parts)
    dims = encoder_dims(ct2, hidden_size)
    tensors = encoder_tensors(ct2, dims)
    dtype = tensors["audio_tower.conv1.weight"].dtype
    shapes = canonical_tensor_shapes(dims)
    for name in PROJECTOR:
        tensors[name] = audio_tensor(name, shapes[name], seed).to(dtype)
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise VoxtralError(f"{parts[0]}: '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)}")
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    write_safetensors(out_dir / "model.safetensors", specs, lambda spec: tensors[spec.name], {"format": "pt"})
    config = hf_config(dims, NO_LANGUAGE_MODEL)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    preprocessor = {**PREPROCESSOR_CONFIG, "feature_size": dims.n_mels}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return dims
