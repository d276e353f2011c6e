"""transformers' layout: config.json + model.safetensors, or shards named by model.safetensors.index.json.

MLX conversions keep these names, files and config, so the file-finding and dims live here for both.
"""

from __future__ import annotations

from pathlib import Path

from voxtral_coreml.encoders.dims import CONV_KERNEL, CONV_WEIGHTS, EncoderDims
from voxtral_coreml.pipeline.errors import VoxtralError, read_json
from voxtral_coreml.sources.safetensors_io import TensorInfo, read_header

from .base import Layout, SourceTensor, config_int, is_audio_tensor, safe_member, stored_tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"

Headers = dict[str, tuple[Path, TensorInfo]]  # tensor name -> (file, where its bytes are)


def audio_files(root: Path) -> list[Path]:
    """model.safetensors, or the shards the index names for audio tensors; none if neither file exists."""
    index_path = root / INDEX
    if not index_path.is_file():
        return [root / SINGLE] if (root / SINGLE).is_file() else []
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise VoxtralError(f"{index_path}: missing 'weight_map'")
    files = sorted({f for name, f in weight_map.items() if is_audio_tensor(name)}, key=str)
    paths = [safe_member(root, f, index_path) for f in files]
    for path in paths:
        if not path.is_file():
            raise VoxtralError(f"{index_path}: names shard '{path.name}', which is missing")
    return paths


def audio_headers(root: Path) -> Headers:
    """Every audio tensor's header entry, read from the files (never the tensors' bytes)."""
    headers: Headers = {}
    for path in audio_files(root):
        headers.update({name: (path, info) for name, info in read_header(path).items() if is_audio_tensor(name)})
    return headers


def written_by_mlx(headers: Headers) -> bool:
    """MLX stores conv weights [out, kernel, in] and quantized weights beside '.scales'; transformers does neither."""
    conv = headers.get(CONV_WEIGHTS[0])
    transposed = conv is not None and len(conv[1].shape) == 3 and conv[1].shape[1] == CONV_KERNEL != conv[1].shape[2]
    return transposed or any(name.endswith(".scales") for name in headers)


def hf_dims(config_path: Path) -> EncoderDims:
    """Dims from a transformers config.json (either transformers' or Whisper's key names for the encoder)."""
    config = read_json(config_path)
    audio, text = config.get("audio_config"), config.get("text_config")
    if not isinstance(audio, dict) or not isinstance(text, dict):
        raise VoxtralError(f"{config_path}: needs 'audio_config' and 'text_config' objects")
    where_a, where_t = f"{config_path}: audio_config", f"{config_path}: text_config"
    return EncoderDims(
        d_model=config_int(audio, ("hidden_size", "d_model"), where_a),
        n_layers=config_int(audio, ("num_hidden_layers", "encoder_layers"), where_a),
        n_heads=config_int(audio, ("num_attention_heads", "encoder_attention_heads"), where_a),
        ffn_dim=config_int(audio, ("intermediate_size", "encoder_ffn_dim"), where_a),
        hidden_size=config_int(text, ("hidden_size",), where_t),
        n_mels=config_int(audio, ("num_mel_bins",), where_a) if "num_mel_bins" in audio else 128,
    )


class HFLayout(Layout):
    name = "hf"

    @staticmethod
    def detect(root: Path) -> bool:
        headers = audio_headers(root)
        return bool(headers) and not written_by_mlx(headers)

    def dims(self) -> EncoderDims:
        return hf_dims(self.root / CONFIG)

    def tensors(self) -> dict[str, SourceTensor]:
        return {name: stored_tensor(name, path, info) for name, (path, info) in audio_headers(self.root).items()}
