"""What every layout shares: the canonical tensor handle, the layout interface, JSON and file-name checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from voxtral_coreml.encoders.dims import EncoderDims
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.safetensors_io import TensorInfo, read_tensor

AUDIO_PREFIXES = ("audio_tower.", "multi_modal_projector.")  # HF and MLX names
MISTRAL_PREFIX = "mm_whisper_embeddings."  # Mistral's consolidated names
REALTIME_MISTRAL_PREFIX = "mm_streams_embeddings.embedding_module."  # Voxtral Realtime's
# The language model's token embeddings, which Mistral stores under the audio prefix (about 0.8 GB for Mini).
MISTRAL_TOKEN_EMBEDDINGS = f"{MISTRAL_PREFIX}tok_embeddings."


def is_audio_tensor(name: str) -> bool:
    return name.startswith(AUDIO_PREFIXES)


def is_mistral_encoder_tensor(name: str) -> bool:
    return name.startswith(MISTRAL_PREFIX) and not name.startswith(MISTRAL_TOKEN_EMBEDDINGS)


def is_encoder_tensor_any_layout(name: str) -> bool:
    """What to fetch from a repo before its layout (or family) is known."""
    realtime = name.startswith(REALTIME_MISTRAL_PREFIX) and ".tok_embeddings." not in name
    return is_audio_tensor(name) or is_mistral_encoder_tensor(name) or realtime


@dataclass(frozen=True)
class SourceTensor:
    """One canonical tensor (name, dtype and shape as extraction writes it) and how to produce it."""

    name: str
    file: Path  # where it is stored, for messages
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def stored_tensor(name: str, path: Path, info: TensorInfo) -> SourceTensor:
    """A tensor stored exactly as the canonical one is (possibly under another name)."""
    return SourceTensor(name, path, info.torch_dtype, info.shape, lambda: read_tensor(path, info))


class Layout:
    """A checkpoint layout: detected from a directory, it gives the encoder's dims and canonical tensors."""

    name: ClassVar[str]

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def detect(root: Path) -> bool:
        raise NotImplementedError

    def dims(self) -> EncoderDims:
        raise NotImplementedError

    def tensors(self) -> dict[str, SourceTensor]:
        """Canonical name -> tensor, for every audio tensor found (checked against dims by extraction)."""
        raise NotImplementedError

    def source_name(self, canonical: str) -> str:
        """The name a canonical tensor has in this layout's files, for messages."""
        return canonical


def safe_member(root: Path, name: object, source: Path) -> Path:
    """A file named by an index, refused if it would leave the checkpoint directory."""
    if not isinstance(name, str) or not name or "\\" in name or name.startswith("/") or ".." in Path(name).parts:
        raise VoxtralError(f"{source}: refusing file name {name!r} (it must stay inside the checkpoint)")
    return root / name


def config_int(section: dict, keys: tuple[str, ...], where: str) -> int:
    """The first of `keys` present in `section` (aliases across config styles), as an integer."""
    for key in keys:
        if key in section:
            value = section[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise VoxtralError(f"{where}: '{key}' must be an integer, got {value!r}")
            return value
    raise VoxtralError(f"{where}: missing '{keys[0]}'")


def config_section(data: dict, keys: tuple[str, ...], source: Path) -> dict:
    """The object at data[keys[0]][keys[1]]..., or an error naming the dotted key."""
    node = data
    for depth, key in enumerate(keys, start=1):
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise VoxtralError(f"{source}: missing '{'.'.join(keys[:depth])}' (expected an object)")
    return node
