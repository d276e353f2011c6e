"""MLX "affine" quantization, read back without MLX: config parsing, bit unpacking, dequantization.

A quantized module `m` stores `m.weight` (uint32 words), `m.scales` and `m.biases` (one per group of
`group_size` consecutive inputs in a row) and dequantizes to w = scales * q + biases. Each row's values are
packed least-significant bits first into one little-endian bit stream, so 3-, 5- and 6-bit values can
straddle two words (mlx/backend/metal/kernels/quantized.h: 8 values in 3 or 5 bytes, 4 six-bit values in 3).
config.json's `quantization` (mlx-lm writes `quantization_config` as an alias) holds the defaults
`group_size`, `bits`, `mode`, and per-module overrides keyed by module path: an object, or false.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from voxtral_coreml.pipeline.errors import VoxtralError

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)  # what mlx.core.quantize accepts in affine mode
GROUP_SIZES = (32, 64, 128)
CONFIG_KEYS = ("quantization", "quantization_config")
WORD_BITS = 32
CHUNK_VALUES = 1 << 22  # values unpacked at a time: bounds the int64 temporaries to ~32 MB each


@dataclass(frozen=True)
class QuantParams:
    bits: int
    group_size: int


def quantization_section(config: dict, config_path: Path) -> dict | None:
    """config.json's MLX quantization object, or None if it has none."""
    for key in CONFIG_KEYS:
        section = config.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise VoxtralError(f"{config_path}: '{key}' must be an object, got {section!r}")
        if "quant_method" not in section:  # transformers' quantization_config names a method; MLX's never does
            return section
    return None


def module_params(section: dict | None, module: str, config_path: Path) -> QuantParams | None:
    """How config.json says `module` is quantized, or None if it says the module is not."""
    if section is None:
        return None
    entry = section.get(module, True)
    if entry is False:
        return None
    if not isinstance(entry, (bool, dict)):
        raise VoxtralError(f"{config_path}: quantization['{module}'] must be an object or false, got {entry!r}")
    where = f"quantization['{module}']" if isinstance(entry, dict) else "quantization"
    merged = {**section, **entry} if isinstance(entry, dict) else section
    mode = merged.get("mode", "affine")
    if mode != "affine":
        raise VoxtralError(f"{config_path}: {where} mode {mode!r} is not supported (only MLX's 'affine')")
    return QuantParams(
        bits=_choice(merged, "bits", AFFINE_BITS, f"{config_path}: {where}"),
        group_size=_choice(merged, "group_size", GROUP_SIZES, f"{config_path}: {where}"),
    )


def _choice(section: dict, key: str, allowed: tuple[int, ...], where: str) -> int:
    value = section.get(key)
    if type(value) is not int or value not in allowed:
        raise VoxtralError(f"{where}: '{key}' is {value!r}, expected one of {', '.join(map(str, allowed))}")
    return value


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """[rows, words] uint32 -> [rows, count] int64 values."""
    words = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))  # a zero word past the end: reading a value's high part is safe
    offset = torch.arange(count) * bits
    index, shift = offset // WORD_BITS, offset % WORD_BITS
    low = words[:, index] >> shift
    high = words[:, index + 1] << (WORD_BITS - shift)  # the part of a value that spills into the next word
    return (low | high) & ((1 << bits) - 1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """[rows, groups * group_size] in the scales' dtype, a block of rows at a time."""
    rows, groups = scales.shape
    count = groups * params.group_size
    out = torch.empty((rows, count), dtype=scales.dtype)
    step = max(1, CHUNK_VALUES // count)
    for start in range(0, rows, step):
        block = slice(start, start + step)
        q = unpack(packed[block], params.bits, count).reshape(-1, groups, params.group_size).to(scales.dtype)
        # As mlx.core.dequantize computes it: the product is rounded to the scales' dtype, then the bias added.
        out[block] = (scales[block, :, None] * q + biases[block, :, None]).reshape(-1, count)
    return out
