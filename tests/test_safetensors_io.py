"""The safetensors reader/writer: interoperable with the real library, and strict about damaged files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.safetensors_io import TensorSpec, read_header, read_tensor, write_safetensors

TENSORS = {
    "a": torch.randn(3, 4).to(torch.bfloat16),
    "b": torch.randn(5),
    "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    "empty": torch.zeros(0, 4, dtype=torch.float16),
}


def test_reads_what_the_safetensors_library_writes(tmp_path: Path) -> None:
    path = tmp_path / "lib.safetensors"
    save_file(TENSORS, path)
    header = read_header(path)
    assert set(header) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert torch.equal(read_tensor(path, header[name]), tensor)


def test_the_safetensors_library_reads_what_we_write(tmp_path: Path) -> None:
    path = tmp_path / "ours.safetensors"
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()]
    write_safetensors(path, specs, lambda spec: TENSORS[spec.name], metadata={"format": "pt"})
    loaded = load_file(path)
    for name, tensor in TENSORS.items():
        assert torch.equal(loaded[name], tensor)


def _file_with_header(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"{not json", b"", None, "not valid JSON"),
        ([1, 2], b"", None, "not a JSON object"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", 10**6, "runs past the file"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", 2**63, "runs past the file"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "run past the data"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "expected 12"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "begin, end"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
    ],
)
def test_damaged_headers_are_named(tmp_path: Path, header, data, length, message) -> None:
    path = _file_with_header(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(VoxtralError, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(VoxtralError, match="run past the data"):
        read_header(path)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(VoxtralError, match="too short"):
        read_header(tmp_path / "short.safetensors")
