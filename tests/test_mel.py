"""The mel front-end package: WhisperFeatureExtractor's numbers from PCM, through the MIL runtime, and its limits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import speech, write_speech
from voxtral_coreml.check.milrun import SUPPORTED_OPS, load_package
from voxtral_coreml.encoders.reference import processor_features
from voxtral_coreml.export.convert import MANIFEST
from voxtral_coreml.export.package_info import package_structure
from voxtral_coreml.features.logmel import WINDOW_SAMPLES, log_mel_windows
from voxtral_coreml.features.mel_package import (
    AUDIO_NAME,
    CENTER_PAD,
    PACKAGE_NAME,
    RIGHT_PAD,
    MelSpectrogram,
    convert_mel_package,
    mel_io_contract,
    pcm_window,
    validate_mel_package,
)
from voxtral_coreml.numerics.metrics import psnr_db
from voxtral_coreml.pipeline.errors import VoxtralError

FP32_GATE_DB = 60.0
FP16_FLOOR_DB = 50.0  # what the fp16 variant must keep; measured about 56 dB on speech


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mel")
    for precision in ("fp32", "fp16"):
        convert_mel_package(root / precision / PACKAGE_NAME, precision)
    return {precision: root / precision for precision in ("fp32", "fp16")}


def _run(package_dir: Path, samples: np.ndarray) -> torch.Tensor:
    model = load_package(package_dir / PACKAGE_NAME)
    return torch.from_numpy(model.predict({AUDIO_NAME: pcm_window(samples)})["mel_spectrogram"])


def test_reflect_padding_is_torch_stfts() -> None:
    audio = torch.randn(1, WINDOW_SAMPLES)
    expected = torch.nn.functional.pad(audio, (CENTER_PAD, RIGHT_PAD), mode="reflect")
    assert torch.equal(MelSpectrogram().reflect_pad(audio), expected)


def test_the_module_is_the_processor_on_a_full_window_of_speech() -> None:
    audio = speech(30)  # every frame, the edge frames included, reads real samples
    with torch.no_grad():
        mel = MelSpectrogram()(torch.from_numpy(pcm_window(audio)))
    assert psnr_db(processor_features(audio), mel) > 110
    assert psnr_db(log_mel_windows(audio), mel) > 110


def test_fp32_package_passes_its_gate_through_the_mil_runtime(packages: dict[str, Path]) -> None:
    metrics = validate_mel_package(packages["fp32"], None, FP32_GATE_DB, backend="mil")
    print(f"mel fp32 package vs WhisperFeatureExtractor: {metrics['psnr_db']} dB, max abs {metrics['max_abs_err']}")
    assert metrics["psnr_db"] >= FP32_GATE_DB and metrics["compute_precision"] == "fp32"
    full = speech(30)
    assert psnr_db(processor_features(full), _run(packages["fp32"], full)) >= FP32_GATE_DB


def test_fp16_package_loses_precision_on_quiet_bins(packages: dict[str, Path]) -> None:
    """fp16 stores powers below 6.1e-5 (log-mel values below about -0.05) as subnormals with few bits left."""
    fp16 = validate_mel_package(packages["fp16"], None, FP16_FLOOR_DB, backend="mil")
    print(f"mel fp16 package vs WhisperFeatureExtractor: {fp16['psnr_db']} dB, max abs {fp16['max_abs_err']}")
    expected = processor_features(speech(30))[0]
    error = (_run(packages["fp16"], speech(30))[0] - expected).abs()
    quiet = expected < -0.06
    assert error[quiet].max() > 10 * error[~quiet].max()  # the error sits where the powers are subnormal


def test_package_contract_and_manifest(packages: dict[str, Path]) -> None:
    structure = package_structure(packages["fp32"] / PACKAGE_NAME)
    contract = mel_io_contract()
    assert structure["inputs"] == contract["inputs"] and structure["outputs"] == contract["outputs"]
    assert set(structure["ops"]) <= SUPPORTED_OPS and "reverse" not in structure["ops"]
    manifest = json.loads((packages["fp16"] / MANIFEST).read_text())
    assert manifest["package"] == PACKAGE_NAME and manifest["compute_precision"] == "fp16"
    assert manifest["features"]["log_floor"] == "per_window"
    assert manifest["deployment_target"]["coreml"] == "iOS16"


def test_on_a_70_s_clip_the_floor_and_window_edges_differ_from_the_processor(packages: dict[str, Path]) -> None:
    """Limit: each window is computed alone. VoxtralProcessor floors at the whole clip's max - 8 and its STFT
    frames at a window's edges read the next window's samples; the package floors per window and reflects."""
    audio = speech(70)
    clip = processor_features(audio)
    for i in range(len(clip)):
        window = audio[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]
        mel = _run(packages["fp32"], window)[0]
        alone = processor_features(window)[0]
        deviation = (mel - clip[i]).abs()
        print(
            f"70 s clip, window {i}: vs per-clip features max abs {deviation.max().item():.3f}, "
            f"PSNR {psnr_db(clip[i], mel):.1f} dB, {(deviation > 1e-3).float().mean().item():.1%} of values off; "
            f"vs the window alone {psnr_db(alone, mel):.1f} dB"
        )
        assert psnr_db(alone, mel) >= FP32_GATE_DB  # per window, it is the processor
    last = _run(packages["fp32"], audio[2 * WINDOW_SAMPLES :])[0]
    assert clip[2].max() < clip.max() and psnr_db(clip[2], last) < 30  # quieter window: higher floor of its own


def test_below_the_gate_is_one_line(packages: dict[str, Path], tmp_path: Path) -> None:
    audio = write_speech(tmp_path / "speech.wav", 3)
    with pytest.raises(VoxtralError, match=r"below the gate of 200.0 dB") as err:
        validate_mel_package(packages["fp16"], audio, 200.0, backend="mil")
    assert PACKAGE_NAME in str(err.value) and "\n" not in str(err.value)


def test_unknown_precision_is_named(tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match="mel compute precision 'int8'"):
        convert_mel_package(tmp_path / PACKAGE_NAME, "int8")
