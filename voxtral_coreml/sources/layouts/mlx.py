"""MLX conversions (mlx.voxtral, mlx-audio, mlx-lm's save_model): transformers' names, files and config.json,
but conv weights stored [out, kernel, in] and, optionally, affine-quantized linear and embedding weights.

Quantized tensors are dequantized one at a time, to the dtype of their scales.
"""

from __future__ import annotations

from pathlib import Path

import torch

from voxtral_coreml.encoders.dims import CONV_KERNEL, CONV_WEIGHTS, POSITIONS_KEY, canonical_tensor_shapes
from voxtral_coreml.pipeline.errors import VoxtralError, read_json
from voxtral_coreml.sources.safetensors_io import FLOAT_DTYPES, TensorInfo, read_tensor

from .base import SourceTensor, stored_tensor
from .hf import CONFIG, Headers, HFLayout, audio_headers, written_by_mlx
from .mlx_quant import WORD_BITS, QuantParams, dequantize, module_params, quantization_section


class MLXLayout(HFLayout):
    name = "mlx"

    @staticmethod
    def detect(root: Path) -> bool:
        headers = audio_headers(root)
        return bool(headers) and written_by_mlx(headers)

    def tensors(self) -> dict[str, SourceTensor]:
        headers = audio_headers(self.root)
        config_path = self.root / CONFIG
        section = quantization_section(read_json(config_path), config_path)
        dims = self.dims()
        expected = {POSITIONS_KEY: (dims.n_positions, dims.d_model), **canonical_tensor_shapes(dims)}
        found: dict[str, SourceTensor] = {}
        packed_parts: set[str] = set()
        for name, (path, info) in headers.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and f"{module}.scales" in headers:
                params = module_params(section, module, config_path)
                if params is None:
                    said = "has no MLX quantization" if section is None else f"quantization['{module}'] is false"
                    raise VoxtralError(f"{config_path}: {said}, but '{module}' is stored quantized")
                found[name] = _quantized(name, headers, params, expected.get(name), config_path)
                packed_parts |= {f"{module}.scales", f"{module}.biases"}
            elif name in CONV_WEIGHTS:
                found[name] = _conv(name, path, info)
            else:
                if leaf == "weight" and section is not None and isinstance(section.get(module), dict):
                    raise VoxtralError(f"{config_path}: quantization['{module}'] is set, but '{name}' is not quantized")
                found[name] = stored_tensor(name, path, info)
        return {name: src for name, src in found.items() if name not in packed_parts}


def _conv(name: str, path: Path, info: TensorInfo) -> SourceTensor:
    shape = info.shape
    if len(shape) != 3 or shape[1] != CONV_KERNEL:
        raise VoxtralError(f"{path}: '{name}' is {list(shape)}; MLX stores conv weights [out, {CONV_KERNEL}, in]")
    out, kernel, inputs = shape
    canonical = (out, inputs, kernel)
    return SourceTensor(
        name, path, info.torch_dtype, canonical, lambda: read_tensor(path, info).transpose(1, 2).contiguous()
    )


def _quantized(
    name: str, headers: Headers, params: QuantParams, expected: tuple[int, ...] | None, config_path: Path
) -> SourceTensor:
    """The dequantized tensor, after checking the packed weight, scales and biases fit `params` (and dims)."""
    module = name.removesuffix(".weight")
    parts = {}
    for part in ("weight", "scales", "biases"):
        if f"{module}.{part}" not in headers:
            raise VoxtralError(f"{headers[name][0]}: '{module}.{part}' is missing (MLX affine quantization)")
        parts[part] = headers[f"{module}.{part}"]
    (path, weight), (_, scales), (_, biases) = parts.values()
    if weight.dtype != "U32" or len(weight.shape) != 2:
        raise VoxtralError(f"{path}: '{name}' is {weight.dtype} {list(weight.shape)}, expected 2-D uint32 (packed)")
    if scales.torch_dtype not in FLOAT_DTYPES or len(scales.shape) != 2 or scales.shape[0] != weight.shape[0]:
        shape = list(scales.shape)
        raise VoxtralError(f"{path}: '{module}.scales' is {scales.dtype} {shape}, expected a float [rows, groups]")
    if (biases.dtype, biases.shape) != (scales.dtype, scales.shape):
        raise VoxtralError(f"{path}: '{module}.biases' is {biases.dtype} {list(biases.shape)}, unlike its scales")
    (rows, words), groups = weight.shape, scales.shape[1]
    inputs = groups * params.group_size
    if words * WORD_BITS != inputs * params.bits or (expected is not None and expected[1:] != (inputs,)):
        raise VoxtralError(f"{config_path}: {_misfit(module, params, words, groups, expected)}")

    def load() -> torch.Tensor:
        read = {part: read_tensor(p, info) for part, (p, info) in parts.items()}
        return dequantize(read["weight"], read["scales"], read["biases"], params)

    return SourceTensor(name, path, scales.torch_dtype, (rows, inputs), load)


def _misfit(module: str, params: QuantParams, words: int, groups: int, expected: tuple[int, ...] | None) -> str:
    """Why the quantization config and the tensors disagree, with what the tensors hold when dims tell."""
    said = f"quantization gives '{module}' {params.bits} bits in groups of {params.group_size}"
    stored = f"{words} packed words and {groups} groups per row"
    if expected is None or len(expected) != 2 or (words * WORD_BITS) % expected[1] or expected[1] % groups:
        return f"{said}, which {stored} do not fit"
    bits, group_size = words * WORD_BITS // expected[1], expected[1] // groups
    return f"{said}, but its {stored} hold {bits} bits in groups of {group_size} for {expected[1]} inputs"
