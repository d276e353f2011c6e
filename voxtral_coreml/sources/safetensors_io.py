"""Safetensors read tensor-by-tensor and written streaming, with every header field checked.

Only safetensors is ever read: it is plain data, so loading weights from the internet cannot run code.
Headers are validated here (lengths, dtypes, shapes, offsets) so a damaged file is named, not crashed on.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from voxtral_coreml.pipeline.errors import JSON_ERRORS, VoxtralError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_NAME = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what weights may be stored (and extracted) as
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live inside a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def parse_header(header_bytes: bytes, data_size: int, source: str) -> dict[str, TensorInfo]:
    """Validate a safetensors JSON header; `data_size` is the byte count after the header."""
    try:
        header = json.loads(header_bytes)
    except JSON_ERRORS as e:
        raise VoxtralError(f"{source}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise VoxtralError(f"{source}: safetensors header is not a JSON object")
    data_start = 8 + len(header_bytes)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _parse_entry(name, entry, data_size, data_start, source)
    _check_no_overlap(tensors.values(), source)
    return tensors


def _parse_entry(name: str, entry: object, data_size: int, data_start: int, source: str) -> TensorInfo:
    where = f"{source}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise VoxtralError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise VoxtralError(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise VoxtralError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise VoxtralError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise VoxtralError(f"{where}: data_offsets {offsets} run past the data ({data_size} bytes)")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise VoxtralError(f"{where}: {end - begin} bytes for shape {shape} {dtype} (expected {expected})")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    # JSON's true/false arrive as bools, which Python counts as ints.
    return type(value) is int and value >= 0


def _check_no_overlap(infos: Iterable[TensorInfo], source: str) -> None:
    previous: TensorInfo | None = None
    for info in sorted(infos, key=lambda t: (t.begin, t.end)):
        if previous is not None and info.begin < previous.end and info.nbytes and previous.nbytes:
            raise VoxtralError(f"{source}: tensors {previous.name!r} and {info.name!r} overlap")
        previous = info


def header_length(prefix: bytes, file_size: int, source: str) -> int:
    """The header byte count from a file's first 8 bytes, checked against the file's size."""
    if len(prefix) < 8 or file_size < 8:
        raise VoxtralError(f"{source}: too short to be a safetensors file ({file_size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise VoxtralError(f"{source}: safetensors header length {n} runs past the file ({file_size} bytes)")
    return n


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    path = Path(path)
    if not path.is_file():
        raise VoxtralError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = header_length(f.read(8), size, str(path))
        header_bytes = f.read(n)
    return parse_header(header_bytes, size - 8 - n, str(path))


def read_tensor(path: str | os.PathLike[str], info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes (and nothing else) from disk."""
    buf = bytearray(info.nbytes)
    with open(path, "rb") as f:
        f.seek(info.begin)
        if f.readinto(buf) != info.nbytes:
            raise VoxtralError(f"{path}: tensor {info.name!r} is truncated")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[TORCH_TO_NAME[self.dtype]][1]


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors written back to back in `specs` order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": TORCH_TO_NAME[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Reinterpret as bytes (bf16 has no numpy dtype), little-endian as the format requires.
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def write_safetensors(
    path: str | os.PathLike[str],
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors one at a time: only the tensor being written is in memory."""
    with open(path, "wb") as f:
        f.write(encode_header(specs, metadata))
        for spec in specs:
            tensor = produce(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise VoxtralError(
                    f"{path}: tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"expected {spec.dtype} {spec.shape}"
                )
            f.write(tensor_bytes(tensor))
