"""`voxtral-coreml encode`: audio of any length -> the embeddings transformers gives the language model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, write_speech
from voxtral_coreml.cli import recipe_config
from voxtral_coreml.encode import encode_audio, save_embeddings
from voxtral_coreml.encoders.reference import TransformersReference, processor_features
from voxtral_coreml.export.convert import MANIFEST
from voxtral_coreml.features.logmel import load_audio
from voxtral_coreml.features.mel_package import PACKAGE_NAME as MEL_PACKAGE
from voxtral_coreml.numerics.metrics import compare_embeddings
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted


@pytest.fixture(scope="module")
def demo_package(demo_repo: Path) -> Path:
    return demo_repo / "artifacts" / "packages" / "demo-mini" / "fp16"


def test_70_s_of_speech_gives_transformers_embeddings(demo_repo: Path, demo_package: Path, tmp_path: Path) -> None:
    audio = write_speech(tmp_path / "speech-70s.wav", 70)
    out = tmp_path / "embeddings.npy"
    result = cli("encode", str(audio), "--package", str(demo_package), "--out", str(out), "--backend", "mil")
    assert result.returncode == 0, result.stderr
    print(result.stdout.strip())
    embeddings = torch.from_numpy(np.load(out))
    weights, dims, _ = load_extracted(demo_repo / "artifacts" / "extracted" / "demo-mini")
    expected = TransformersReference(weights, dims).audio_embeddings(processor_features(load_audio(audio)))
    assert tuple(embeddings.shape) == tuple(expected.shape) == (3 * 375, dims.hidden_size)
    metrics = compare_embeddings(expected, embeddings)
    manifest = json.loads((demo_package / MANIFEST).read_text())
    gate = float(recipe_config(manifest["recipe"]["name"])["psnr_gate_db"])
    print(f"encode 70 s vs get_audio_features: {metrics} (gate {gate} dB)")
    assert metrics["psnr_db"] >= gate
    runtime = r"mil \(this project's MIL runtime\)"
    assert re.search(rf"3 windows of 30 s.*{runtime}: load [\d.]+ s, [\d.]+ s per window", result.stdout)


def test_without_out_it_prints_the_shape(demo_package: Path, tmp_path: Path) -> None:
    result = cli("encode", str(write_speech(tmp_path / "speech.wav", 10)), "--package", str(demo_package))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("audio_embeddings [375, 96] float32 from 10.0 s of audio (1 window of 30 s)")


def test_npy_and_safetensors_hold_the_same_embeddings(demo_package: Path, tmp_path: Path) -> None:
    encoding = encode_audio(write_speech(tmp_path / "speech.wav", 3), demo_package, backend="mil", progress=False)
    assert tuple(encoding.embeddings.shape) == (375, 96) and len(encoding.window_s) == 1
    save_embeddings(tmp_path / "e.npy", encoding.embeddings)
    save_embeddings(tmp_path / "e.safetensors", encoding.embeddings)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "e.npy")), encoding.embeddings)
    assert torch.equal(load_file(tmp_path / "e.safetensors")["audio_embeddings"], encoding.embeddings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "e.safetensors", "speech.wav"]  # no leftovers


def test_unknown_output_format_fails_before_any_work(demo_package: Path, tmp_path: Path) -> None:
    result = cli("encode", str(tmp_path / "missing.wav"), "--package", str(demo_package), "--out", "e.pt")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: e.pt: unknown output format '.pt'; use .npy or .safetensors"


def test_bad_audio_is_one_line(demo_package: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("not audio\n")
    result = cli("encode", str(text), "--package", str(demo_package))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {text}: not a readable audio file")


def test_the_mel_package_is_not_an_encoder(demo_repo: Path, tmp_path: Path) -> None:
    mel_dir = demo_repo / "artifacts" / "mel" / "fp32"
    with pytest.raises(VoxtralError, match=rf"{MEL_PACKAGE}: not an encoder package"):
        encode_audio(tmp_path / "unused.wav", mel_dir / MEL_PACKAGE)
