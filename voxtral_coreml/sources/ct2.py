"""CTranslate2's `model.bin`, read with numpy alone: a flat list of named arrays (no pickle, nothing executed).

Layout (binary version 6, little-endian): u32 version, string spec name, u32 revision, u32 count, then per
variable: string name, u8 rank, u32 dims, u8 dtype id, u32 byte count, bytes; then u32 alias count and
(alias, target) string pairs. A string is a u16 length (with the NUL), its UTF-8 bytes and a NUL.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from voxtral_coreml.pipeline.errors import VoxtralError

CT2_VERSION = 6
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # bfloat16 (5) is not read


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise VoxtralError(f"{self.source}: truncated CTranslate2 model (needs {n} bytes at offset {self.pos})")
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def uint(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.uint("H")))
        if not raw.endswith(b"\0"):
            raise VoxtralError(f"{self.source}: malformed string at offset {self.pos}")
        return raw[:-1].decode("utf-8", errors="replace")


def read_ct2_bytes(data: bytes, source: str) -> dict[str, np.ndarray]:
    """Variable name -> array (aliases resolved to their target's array)."""
    reader = _Reader(data, source)
    version = reader.uint("I")
    if version != CT2_VERSION:
        raise VoxtralError(f"{source}: CTranslate2 binary version {version}, expected {CT2_VERSION}")
    reader.string()  # spec name, e.g. WhisperSpec
    reader.uint("I")  # spec revision
    arrays: dict[str, np.ndarray] = {}
    for _ in range(reader.uint("I")):
        name = reader.string()
        shape = tuple(reader.uint("I") for _ in range(reader.uint("B")))
        dtype_id, nbytes = reader.uint("B"), reader.uint("I")
        if dtype_id not in CT2_DTYPES:
            raise VoxtralError(f"{source}: variable '{name}' has unsupported dtype id {dtype_id}")
        dtype = np.dtype(CT2_DTYPES[dtype_id])
        if nbytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise VoxtralError(f"{source}: variable '{name}' holds {nbytes} bytes, not {list(shape)} {dtype}")
        arrays[name] = np.frombuffer(reader.take(nbytes), dtype=dtype).reshape(shape).copy()
    for _ in range(reader.uint("I")):
        alias, target = reader.string(), reader.string()
        if target in arrays:
            arrays[alias] = arrays[target]
    return arrays


def read_ct2_model(parts: list[Path]) -> dict[str, np.ndarray]:
    """A model.bin, whole or split into parts (concatenated in the order given)."""
    if not parts:
        raise VoxtralError("no CTranslate2 model.bin parts given")
    for part in parts:
        if not part.is_file():
            raise VoxtralError(f"{part}: CTranslate2 model part not found")
    return read_ct2_bytes(b"".join(p.read_bytes() for p in parts), str(parts[0]))
