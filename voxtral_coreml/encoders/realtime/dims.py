"""The Realtime encoder's dimensions and the canonical (HF) tensor names and shapes that follow from them.

Every Realtime shape is derived here, once, as `voxtral_coreml.encoders.dims` does for the 2507 encoder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from voxtral_coreml.encoders.dims import CONV_KERNEL, FRAMES_PER_EMBEDDING, MEL_BINS, MEL_FRAMES
from voxtral_coreml.pipeline.errors import VoxtralError

FAMILY = "realtime"
MEL_FRAMES_PER_TOKEN = 2 * FRAMES_PER_EMBEDDING  # conv2's stride 2, then 4 frames per embedding: 8 (80 ms)
SLIDING_WINDOW = 750  # transformers' VoxtralRealtimeEncoderConfig default: 15 s of encoder positions
STATE_ALIGN = 32  # Core ML states want dimensions that are multiples of 32
STREAM_CHECK_FRAMES = 7040  # validation streams 70.4 s: 880 tokens, 3520 positions, the 750-slot ring wraps 4 times
MAX_STATE_BYTES = 1 << 30  # fp16 caches beyond 1 GiB: no iPhone keeps a model that large on the Neural Engine
CONV1_CONTEXT = CONV_KERNEL - 1  # causal left context of conv1 (stride 1), in mel frames
CONV2_CONTEXT = CONV_KERNEL - 2  # causal left context of conv2 (stride 2), in conv1 frames


@dataclass(frozen=True)
class RealtimeDims:
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int  # heads x head_dim is wider than d_model in the real model (32 x 64 = 2048 vs 1280)
    ffn_dim: int
    hidden_size: int  # H: the language model's width, the projector's output
    rope_theta: float
    sliding_window: int = SLIDING_WINDOW
    n_mels: int = MEL_BINS
    mel_frames: int = MEL_FRAMES  # the offline package's window (30 s by default)
    family: str = FAMILY

    def __post_init__(self) -> None:
        sizes = (self.d_model, self.n_layers, self.n_heads, self.head_dim, self.ffn_dim, self.hidden_size)
        if min(sizes) <= 0 or self.sliding_window <= 1 or self.rope_theta <= 0:
            raise VoxtralError(f"encoder dimensions must be positive: {self}")
        if self.head_dim % 2:
            raise VoxtralError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.mel_frames % MEL_FRAMES_PER_TOKEN:
            raise VoxtralError(f"mel_frames {self.mel_frames} is not a multiple of {MEL_FRAMES_PER_TOKEN}")
        if self.cache_bytes > MAX_STATE_BYTES:
            raise VoxtralError(
                f"sliding_window {self.sliding_window}: the streaming state would hold {self.cache_bytes / 2**30:.1f} "
                f"GiB of keys and values ({self.n_layers} layers x 2 x {self.cache_slots} x {self.attn_dim} fp16), "
                f"more than the {MAX_STATE_BYTES >> 30} GiB a device can keep"
            )

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def n_positions(self) -> int:
        return self.mel_frames // 2

    @property
    def n_embeddings(self) -> int:
        return self.mel_frames // MEL_FRAMES_PER_TOKEN

    @property
    def projector_in(self) -> int:
        return self.d_model * FRAMES_PER_EMBEDDING

    @property
    def cache_slots(self) -> int:
        """Ring-buffer slots per layer: the window's past (window - 1 positions), rounded up for Core ML states."""
        return math.ceil((self.sliding_window - 1) / STATE_ALIGN) * STATE_ALIGN

    @property
    def cache_bytes(self) -> int:
        return 2 * self.n_layers * self.cache_slots * self.attn_dim * 2  # keys and values, fp16

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return canonical_tensor_shapes(self)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object], source: str) -> RealtimeDims:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "family"}
        try:
            return cls(**{k: float(v) if k == "rope_theta" else int(v) for k, v in fields.items()})  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError) as e:
            raise VoxtralError(f"{source}: invalid encoder dimensions ({e})") from None


def layer_tensor_shapes(dims: RealtimeDims, i: int) -> dict[str, tuple[int, ...]]:
    d, a, f, p = dims.d_model, dims.attn_dim, dims.ffn_dim, f"audio_tower.layers.{i}."
    return {
        f"{p}self_attn.q_proj.weight": (a, d),
        f"{p}self_attn.q_proj.bias": (a,),
        f"{p}self_attn.k_proj.weight": (a, d),  # no bias, as Whisper's
        f"{p}self_attn.v_proj.weight": (a, d),
        f"{p}self_attn.v_proj.bias": (a,),
        f"{p}self_attn.o_proj.weight": (d, a),
        f"{p}self_attn.o_proj.bias": (d,),
        f"{p}self_attn_layer_norm.weight": (d,),  # RMSNorm: no bias
        f"{p}final_layer_norm.weight": (d,),
        f"{p}mlp.gate_proj.weight": (f, d),
        f"{p}mlp.up_proj.weight": (f, d),
        f"{p}mlp.down_proj.weight": (d, f),
        f"{p}mlp.down_proj.bias": (d,),
    }


def canonical_tensor_shapes(dims: RealtimeDims) -> dict[str, tuple[int, ...]]:
    """HF names (the canonical ones) -> shapes, for the audio tower and projector."""
    d = dims.d_model
    shapes: dict[str, tuple[int, ...]] = {
        "audio_tower.embedder.conv1.weight": (d, dims.n_mels, CONV_KERNEL),
        "audio_tower.embedder.conv1.bias": (d,),
        "audio_tower.embedder.conv2.weight": (d, d, CONV_KERNEL),
        "audio_tower.embedder.conv2.bias": (d,),
    }
    for i in range(dims.n_layers):
        shapes.update(layer_tensor_shapes(dims, i))
    shapes["audio_tower.norm.weight"] = (d,)
    shapes["multi_modal_projector.linear_1.weight"] = (dims.hidden_size, dims.projector_in)
    shapes["multi_modal_projector.linear_2.weight"] = (dims.hidden_size, dims.hidden_size)
    return shapes
