"""Our log-mel features are VoxtralProcessor's, and bad audio either converts as documented or fails in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from conftest import speech
from voxtral_coreml.encoders.dims import MEL_BINS, MEL_FRAMES
from voxtral_coreml.encoders.reference import processor_features
from voxtral_coreml.features.logmel import HOP_LENGTH, MIN_SAMPLES, SAMPLE_RATE, load_audio, log_mel_windows
from voxtral_coreml.pipeline.errors import VoxtralError

TOLERANCE = 1e-4


@pytest.mark.parametrize(("seconds", "windows"), [(10, 1), (70, 3)])
def test_features_are_the_processors_on_real_speech(seconds: float, windows: int) -> None:
    audio = speech(seconds)
    ours, theirs = log_mel_windows(audio), processor_features(audio)
    assert tuple(ours.shape) == tuple(theirs.shape) == (windows, MEL_BINS, MEL_FRAMES)
    diff = (ours - theirs).abs().max().item()
    print(f"{seconds} s of speech: max abs diff vs WhisperFeatureExtractor {diff:.3g}")
    assert diff <= TOLERANCE


def _write(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    soundfile.write(path, samples, rate, subtype="FLOAT")  # float: read back bit for bit
    return path


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(VoxtralError, match=match) as err:
        load_audio(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_stereo_is_averaged_to_mono(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    left = speech(5)
    stereo = np.stack([left, 0.25 * left[::-1]], axis=1)  # two different channels
    with caplog.at_level("INFO"):
        mono = load_audio(_write(tmp_path / "stereo.wav", stereo))
    np.testing.assert_array_equal(mono, stereo.mean(axis=1, dtype=np.float32))
    assert "2 channels averaged to mono" in caplog.text


def test_8_khz_is_resampled_with_soxr(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    narrowband = speech(4)[::2].copy()  # 4 s at 16 kHz, taken as 8 s at 8 kHz
    with caplog.at_level("INFO"):
        audio = load_audio(_write(tmp_path / "8k.wav", narrowband, 8000))
    expected = soxr.resample(narrowband, 8000, SAMPLE_RATE, quality="HQ")
    assert audio.dtype == np.float32 and len(audio) == 2 * len(narrowband)
    np.testing.assert_allclose(audio, expected, rtol=0, atol=1e-7)
    assert "resampled from 8000 Hz to 16000 Hz" in caplog.text


def test_a_tenth_of_a_second_is_padded_to_one_window_as_the_processor_does(tmp_path: Path) -> None:
    clip = speech(0.1)
    audio = load_audio(_write(tmp_path / "short.wav", clip))
    mel = log_mel_windows(audio)
    assert tuple(mel.shape) == (1, MEL_BINS, MEL_FRAMES)
    assert (mel - processor_features(audio)).abs().max().item() <= TOLERANCE
    # Past the clip (and the 400-sample frame reaching into it) every value is the floor: silence.
    past = len(clip) // HOP_LENGTH + 2
    assert (mel[0, :, past:] == mel.min()).all()
    assert (mel[0, :, :past] > mel.min()).any()


def test_shorter_than_one_fft_frame_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "click.wav", speech(0.01))
    assert round(0.01 * SAMPLE_RATE) < MIN_SAMPLES
    _one_line_error(path, r"160 samples is shorter than one 400-sample frame")


def test_empty_audio_is_refused(tmp_path: Path) -> None:
    _one_line_error(_write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32)), "the audio is empty")


def test_a_file_that_is_not_audio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples\n")
    _one_line_error(path, "not a readable audio file")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nowhere.flac", "audio file not found")


def test_nan_samples_are_refused(tmp_path: Path) -> None:
    samples = speech(1)
    samples[100] = np.nan
    _one_line_error(_write(tmp_path / "nan.wav", samples), "NaN or Inf")
