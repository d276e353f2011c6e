"""Extraction: only the audio tensors are read, they come out canonical, and bad checkpoints are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import voxtral_coreml.sources.layouts.base as layout_base
from conftest import DEMO_DIMS, write_checkpoint
from voxtral_coreml.encoders.dims import ENCODER_JSON, POSITIONS_KEY, WEIGHTS_FILE, EncoderDims, canonical_tensor_shapes
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import extract_audio_tower, load_extracted
from voxtral_coreml.sources.safetensors_io import read_header, read_tensor


def _source_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in checkpoint.glob("model-*.safetensors"):
        for name, info in read_header(shard).items():
            tensors[name] = read_tensor(shard, info)
    return tensors


def test_audio_tower_crosses_a_shard_boundary(checkpoint: Path) -> None:
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    audio_shards = {f for n, f in weight_map.items() if n.startswith("audio_tower.")}
    assert len(audio_shards) >= 2
    assert any(n.startswith("language_model.") for n in weight_map)


def test_extracts_canonical_tensors_bit_exact_and_reads_no_language_model(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_names: list[str] = []
    real_read = layout_base.read_tensor
    monkeypatch.setattr(layout_base, "read_tensor", lambda p, info: read_names.append(info.name) or real_read(p, info))
    summary = extract_audio_tower(checkpoint, tmp_path / "out")

    assert read_names and all(n.startswith(("audio_tower.", "multi_modal_projector.")) for n in read_names)
    source = _source_tensors(checkpoint)
    weights, dims, meta = load_extracted(tmp_path / "out", dtype=torch.bfloat16)
    assert dims == DEMO_DIMS
    assert set(weights) == set(canonical_tensor_shapes(DEMO_DIMS))  # sinusoid positions are recomputed
    for name, tensor in weights.items():
        assert torch.equal(tensor, source[name]), name
    assert meta["positions"] == "sinusoid"
    assert summary["weights_sha256"] == meta["weights_sha256"]


def test_weights_hash_depends_on_weights_only(tmp_path: Path) -> None:
    a = extract_audio_tower(write_checkpoint(tmp_path / "a", seed=1), tmp_path / "xa")
    b = extract_audio_tower(write_checkpoint(tmp_path / "b", seed=1), tmp_path / "xb")
    c = extract_audio_tower(write_checkpoint(tmp_path / "c", seed=2), tmp_path / "xc")
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]


def test_non_sinusoid_positions_are_kept(checkpoint: Path, tmp_path: Path) -> None:
    _rewrite_tensor(checkpoint, POSITIONS_KEY, lambda t: t * 0 + 0.5)
    meta = extract_audio_tower(checkpoint, tmp_path / "out")
    assert meta["positions"] == "stored"
    assert POSITIONS_KEY in read_header(tmp_path / "out" / WEIGHTS_FILE)


def _rewrite_tensor(checkpoint: Path, name: str, change) -> None:
    """Rewrite one tensor's bytes in place (same dtype and shape)."""
    shard = checkpoint / json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"][name]
    info = read_header(shard)[name]
    new = change(read_tensor(shard, info)).to(info.torch_dtype).contiguous()
    data = bytearray(shard.read_bytes())
    data[info.begin : info.end] = new.view(torch.uint8).numpy().tobytes()
    shard.write_bytes(bytes(data))


def _rewrite_header(checkpoint: Path, name: str, change) -> None:
    """Apply change(header) to the header of the shard holding `name`, keeping the header's length."""
    shard = checkpoint / json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"][name]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    shard.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])


def _recast_to_integers(checkpoint: Path, name: str) -> None:
    """The same bytes declared as integers of the same width."""

    def recast(header: dict) -> None:
        header[name]["dtype"] = {"BF16": "I16", "F16": "I16", "F32": "I32"}[header[name]["dtype"]]

    _rewrite_header(checkpoint, name, recast)


def _drop_tensor(checkpoint: Path, name: str) -> None:
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    _rewrite_header(checkpoint, name, lambda header: header.pop(name))  # its bytes stay, unreferenced: still valid
    index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))


def _use_config_of(checkpoint: Path, dims: EncoderDims) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["hidden_size"] = dims.hidden_size
    config["audio_config"]["num_hidden_layers"] = dims.n_layers
    (checkpoint / "config.json").write_text(json.dumps(config))


ROW_3 = torch.tensor([3])
SMALL_DIMS = EncoderDims(64, 2, 4, 256, hidden_size=160)  # demo-small's projector width with demo-mini's tower


def _small_weights_with_minis_config(checkpoint: Path) -> None:
    """A Small checkpoint's weights under a Mini checkpoint's config.json."""
    config = (checkpoint / "config.json").read_bytes()
    for path in checkpoint.iterdir():
        path.unlink()
    write_checkpoint(checkpoint, SMALL_DIMS)
    (checkpoint / "config.json").write_bytes(config)


BAD_CHECKPOINTS = {
    "missing tensor": (
        lambda c: _drop_tensor(c, "audio_tower.layers.1.fc2.bias"),
        "tensor 'audio_tower.layers.1.fc2.bias' is missing",
    ),
    "wider projector than the config": (
        lambda c: _use_config_of(c, EncoderDims(64, 2, 4, 256, hidden_size=3072)),
        r"'multi_modal_projector.linear_1.weight' has shape \[96, 256\], the config implies \[3072, 256\]",
    ),
    "fewer layers in the config": (
        lambda c: _use_config_of(c, EncoderDims(64, 1, 4, 256, 96)),
        "unexpected audio tensor 'audio_tower.layers.1",
    ),
    "NaN weight": (
        lambda c: _rewrite_tensor(c, "audio_tower.layers.0.fc1.weight", lambda t: t.index_fill(0, ROW_3, float("nan"))),
        "'audio_tower.layers.0.fc1.weight' contains NaN or Inf",
    ),
    "Inf weight": (
        lambda c: _rewrite_tensor(c, "audio_tower.conv1.bias", lambda t: t.index_fill(0, ROW_3, float("inf"))),
        "'audio_tower.conv1.bias' contains NaN or Inf",
    ),
    "integer weights": (
        lambda c: _recast_to_integers(c, "audio_tower.layers.0.fc2.bias"),
        r"'audio_tower.layers.0.fc2.bias' has dtype torch.int(16|32), expected a float",
    ),
    "Small weights with Mini's config": (
        _small_weights_with_minis_config,
        r"'multi_modal_projector.linear_1.weight' has shape \[160, 256\], the config implies \[96, 256\]",
    ),
    "corrupted header": (
        lambda c: (c / "model-00002-of-00003.safetensors").write_bytes(b"\xff" * 64),
        "model-00002-of-00003.safetensors: safetensors header length",
    ),
    "shard missing": (
        lambda c: (c / "model-00001-of-00003.safetensors").unlink(),
        "names shard 'model-00001-of-00003.safetensors', which is missing",
    ),
    "index escaping the checkpoint": (
        lambda c: (c / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"audio_tower.conv1.weight": "../evil.safetensors"}})
        ),
        "refusing file name '../evil.safetensors'",
    ),
    "config without audio_config": (
        lambda c: (c / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 96}})),
        "needs 'audio_config' and 'text_config'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoints_get_one_clear_line_and_no_output(checkpoint: Path, tmp_path: Path, case: str) -> None:
    damage, message = BAD_CHECKPOINTS[case]
    damage(checkpoint)
    out = tmp_path / "out"
    with pytest.raises(VoxtralError, match=message) as err:
        extract_audio_tower(checkpoint, out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no staging leftovers


def test_extracted_output_is_checked_when_loaded(extracted: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((extracted / ENCODER_JSON).read_text())
    meta["dims"]["hidden_size"] = 128
    (broken / ENCODER_JSON).write_text(json.dumps(meta))
    (broken / WEIGHTS_FILE).write_bytes((extracted / WEIGHTS_FILE).read_bytes())
    with pytest.raises(VoxtralError, match=r"multi_modal_projector.linear_1.weight' is \[96, 256\], expected \[128"):
        load_extracted(broken)
