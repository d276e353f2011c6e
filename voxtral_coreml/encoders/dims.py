"""The encoder's dimensions and the canonical tensor names and shapes that follow from them.

Every shape in the project is derived here, once: the extractor checks checkpoints against it, the
synthetic writer produces it, and the ANE module and the reference are built from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from voxtral_coreml.pipeline.errors import JSON_ERRORS, VoxtralError

MEL_BINS = 128
MEL_FRAMES = 3000  # 30 s at a 10 ms hop: the only input length Voxtral accepts
FRAMES_PER_EMBEDDING = 4  # the projector stacks 4 encoder frames into one embedding
CONV_KERNEL = 3  # both convolutions; canonical (PyTorch) conv weights are [out, in, kernel]
CONV_WEIGHTS = ("audio_tower.conv1.weight", "audio_tower.conv2.weight")


@dataclass(frozen=True)
class EncoderDims:
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    hidden_size: int  # H: the language model's width, the projector's output
    n_mels: int = MEL_BINS
    mel_frames: int = MEL_FRAMES

    def __post_init__(self) -> None:
        if min(self.d_model, self.n_layers, self.n_heads, self.ffn_dim, self.hidden_size) <= 0:
            raise VoxtralError(f"encoder dimensions must be positive: {self}")
        if self.d_model % self.n_heads:
            raise VoxtralError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.mel_frames % (2 * FRAMES_PER_EMBEDDING):
            raise VoxtralError(f"mel_frames {self.mel_frames} is not a multiple of {2 * FRAMES_PER_EMBEDDING}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_positions(self) -> int:
        return self.mel_frames // 2  # conv2 has stride 2

    @property
    def n_embeddings(self) -> int:
        return self.n_positions // FRAMES_PER_EMBEDDING

    @property
    def projector_in(self) -> int:
        return self.d_model * FRAMES_PER_EMBEDDING

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return canonical_tensor_shapes(self)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object], source: str) -> EncoderDims:
        try:
            return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__ if k in data})  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError) as e:
            raise VoxtralError(f"{source}: invalid encoder dimensions ({e})") from None


def layer_tensor_shapes(dims: EncoderDims, i: int) -> dict[str, tuple[int, ...]]:
    d, f, p = dims.d_model, dims.ffn_dim, f"audio_tower.layers.{i}."
    shapes: dict[str, tuple[int, ...]] = {}
    for proj in ("q", "k", "v", "out"):
        shapes[f"{p}self_attn.{proj}_proj.weight"] = (d, d)
        if proj != "k":  # Whisper's k_proj has no bias
            shapes[f"{p}self_attn.{proj}_proj.bias"] = (d,)
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        shapes[f"{p}{norm}.weight"] = (d,)
        shapes[f"{p}{norm}.bias"] = (d,)
    shapes[f"{p}fc1.weight"] = (f, d)
    shapes[f"{p}fc1.bias"] = (f,)
    shapes[f"{p}fc2.weight"] = (d, f)
    shapes[f"{p}fc2.bias"] = (d,)
    return shapes


def canonical_tensor_shapes(dims: EncoderDims) -> dict[str, tuple[int, ...]]:
    """HF names (the canonical ones) -> shapes, for the audio tower and projector, positions excluded."""
    d = dims.d_model
    conv1, conv2 = CONV_WEIGHTS
    shapes: dict[str, tuple[int, ...]] = {
        conv1: (d, dims.n_mels, CONV_KERNEL),
        "audio_tower.conv1.bias": (d,),
        conv2: (d, d, CONV_KERNEL),
        "audio_tower.conv2.bias": (d,),
    }
    for i in range(dims.n_layers):
        shapes.update(layer_tensor_shapes(dims, i))
    shapes["audio_tower.layer_norm.weight"] = (d,)
    shapes["audio_tower.layer_norm.bias"] = (d,)
    shapes["multi_modal_projector.linear_1.weight"] = (dims.hidden_size, dims.projector_in)
    shapes["multi_modal_projector.linear_2.weight"] = (dims.hidden_size, dims.hidden_size)
    return shapes


POSITIONS_KEY = "audio_tower.embed_positions.weight"
ENCODER_JSON = "encoder.json"
WEIGHTS_FILE = "encoder.safetensors"


def read_encoder_json(extracted_dir: str | os.PathLike[str]) -> dict[str, object]:
    path = Path(extracted_dir) / ENCODER_JSON
    if not path.is_file():
        raise VoxtralError(f"{path}: not found (run the extract stage first)")
    try:
        return json.loads(path.read_text())
    except JSON_ERRORS as e:
        raise VoxtralError(f"{path}: invalid JSON ({e})") from None
