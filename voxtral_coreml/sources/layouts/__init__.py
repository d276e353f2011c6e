"""Checkpoint layouts on disk, each mapped to the canonical (HF) tensor names and shapes.

A layout knows where each audio tensor lives and how to turn it into the canonical tensor; extraction
never needs to know which layout it reads. Detection looks at file names and tensor headers only.
"""

from __future__ import annotations

from pathlib import Path

from voxtral_coreml.pipeline.errors import VoxtralError, read_json

from .base import Layout, SourceTensor, is_encoder_tensor_any_layout
from .hf import HFLayout
from .mistral import MistralLayout
from .mlx import MLXLayout

__all__ = [
    "LAYOUTS",
    "Layout",
    "SourceTensor",
    "is_encoder_tensor_any_layout",
    "open_layout",
    "read_json",
]

# Detection order: a full clone of a Mistral repo holds both the HF and the Mistral files; either would do.
LAYOUTS: dict[str, type[Layout]] = {layout.name: layout for layout in (HFLayout, MLXLayout, MistralLayout)}


def open_layout(root: Path, layout: str = "auto", layouts: dict[str, type[Layout]] = LAYOUTS) -> Layout:
    """The checkpoint's layout among `layouts` (a family's; the 2507 family's by default)."""
    if not root.is_dir():
        raise VoxtralError(f"{root}: checkpoint directory not found")
    if layout != "auto":
        if layout not in layouts:
            raise VoxtralError(f"unknown checkpoint layout {layout!r}; choose auto or one of {', '.join(layouts)}")
        return layouts[layout](root)
    for cls in layouts.values():
        if cls.detect(root):
            return cls(root)
    raise VoxtralError(
        f"{root}: no known checkpoint layout (expected audio_tower.* tensors in model.safetensors[.index.json], "
        "or mm_whisper_embeddings.* tensors in consolidated.safetensors beside params.json)"
    )
