"""Checkpoint layouts on disk, each mapped to the canonical (HF) tensor names and shapes.

A layout knows where each audio tensor lives and how to turn it into the canonical tensor; extraction
never needs to know which layout it reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .dims import EncoderDims
from .errors import VoxtralError
from .safetensors_io import TensorInfo, read_header, read_tensor

AUDIO_PREFIXES = ("audio_tower.", "multi_modal_projector.")  # HF and MLX names
MISTRAL_PREFIX = "mm_whisper_embeddings."  # Mistral's consolidated names


def is_audio_tensor(name: str) -> bool:
    return name.startswith(AUDIO_PREFIXES)


def is_encoder_tensor_any_layout(name: str) -> bool:
    """What to fetch from a repo before its layout is known."""
    return name.startswith((*AUDIO_PREFIXES, MISTRAL_PREFIX))


@dataclass(frozen=True)
class SourceTensor:
    """One canonical tensor and how to read it from the checkpoint."""

    name: str
    file: Path
    info: TensorInfo
    load: Callable[[], torch.Tensor]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise VoxtralError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VoxtralError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise VoxtralError(f"{path}: expected a JSON object")
    return data


def safe_member(root: Path, name: object, source: Path) -> Path:
    """A file named by an index, refused if it would leave the checkpoint directory."""
    if not isinstance(name, str) or not name or "\\" in name or name.startswith("/") or ".." in Path(name).parts:
        raise VoxtralError(f"{source}: refusing file name {name!r} (it must stay inside the checkpoint)")
    return root / name


def _config_int(section: dict, keys: tuple[str, ...], where: str) -> int:
    for key in keys:
        if key in section:
            value = section[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise VoxtralError(f"{where}: '{key}' must be an integer, got {value!r}")
            return value
    raise VoxtralError(f"{where}: missing '{keys[0]}'")


class HFLayout:
    """transformers' layout: config.json + model.safetensors, or shards named by model.safetensors.index.json."""

    name = "hf"

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def detect(root: Path) -> bool:
        return (root / "model.safetensors.index.json").is_file() or (root / "model.safetensors").is_file()

    def dims(self) -> EncoderDims:
        config_path = self.root / "config.json"
        config = read_json(config_path)
        audio, text = config.get("audio_config"), config.get("text_config")
        if not isinstance(audio, dict) or not isinstance(text, dict):
            raise VoxtralError(f"{config_path}: needs 'audio_config' and 'text_config' objects")
        where_a, where_t = f"{config_path}: audio_config", f"{config_path}: text_config"
        return EncoderDims(
            d_model=_config_int(audio, ("hidden_size", "d_model"), where_a),
            n_layers=_config_int(audio, ("num_hidden_layers", "encoder_layers"), where_a),
            n_heads=_config_int(audio, ("num_attention_heads", "encoder_attention_heads"), where_a),
            ffn_dim=_config_int(audio, ("intermediate_size", "encoder_ffn_dim"), where_a),
            hidden_size=_config_int(text, ("hidden_size",), where_t),
            n_mels=_config_int(audio, ("num_mel_bins",), where_a) if "num_mel_bins" in audio else 128,
        )

    def _audio_files(self) -> list[Path]:
        index_path = self.root / "model.safetensors.index.json"
        if not index_path.is_file():
            return [self.root / "model.safetensors"]
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise VoxtralError(f"{index_path}: missing 'weight_map'")
        files = sorted({f for name, f in weight_map.items() if is_audio_tensor(name)}, key=str)
        paths = [safe_member(self.root, f, index_path) for f in files]
        for path in paths:
            if not path.is_file():
                raise VoxtralError(f"{index_path}: names shard '{path.name}', which is missing")
        return paths

    def tensors(self) -> dict[str, SourceTensor]:
        found: dict[str, SourceTensor] = {}
        for path in self._audio_files():
            for name, info in read_header(path).items():
                if is_audio_tensor(name):
                    found[name] = SourceTensor(name, path, info, lambda p=path, i=info: read_tensor(p, i))
        return found


LAYOUTS = {"hf": HFLayout}


def open_layout(root: Path, layout: str = "auto") -> HFLayout:
    if not root.is_dir():
        raise VoxtralError(f"{root}: checkpoint directory not found")
    if layout != "auto":
        if layout not in LAYOUTS:
            raise VoxtralError(f"unknown checkpoint layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
        return LAYOUTS[layout](root)
    for cls in LAYOUTS.values():
        if cls.detect(root):
            return cls(root)
    raise VoxtralError(f"{root}: no known checkpoint layout (expected model.safetensors[.index.json])")
