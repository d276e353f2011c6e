"""Voxtral's log-mel features: WhisperFeatureExtractor's math as VoxtralProcessor applies it.

The clip is zero-padded to a multiple of 30 s, one STFT runs over the whole clip, the log floor
(max - 8) uses the maximum of the whole clip, and only then is it cut into [N, n_mels, 3000] windows.
The number of mel bins is the checkpoint's (`EncoderDims.n_mels`: 128 for Voxtral, 80 for Whisper base).
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from voxtral_coreml.encoders.dims import MEL_BINS, MEL_FRAMES
from voxtral_coreml.numerics.stable import stored_float32
from voxtral_coreml.pipeline.errors import VoxtralError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
WINDOW_SAMPLES = MEL_FRAMES * HOP_LENGTH  # 480000: 30 s
MIN_SAMPLES = N_FFT  # shorter than one FFT frame is not speech
LOG_CLAMP = 1e-10  # mel power floor before log10
LOG_RANGE = 8.0  # log-mel values below max - 8 are raised to it


def builtin_speech_clip() -> Path:
    """27 s of English speech (espeak-ng), shipped with the package for validation."""
    return Path(str(resources.files("voxtral_coreml") / "data" / "speech_en.flac"))


def load_audio(path: str | os.PathLike[str]) -> np.ndarray:
    """Mono float32 at 16 kHz. Multichannel audio is averaged to mono; other rates are resampled (soxr)."""
    import soundfile
    import soxr

    path = Path(path)
    if not path.is_file():
        raise VoxtralError(f"{path}: audio file not found")
    try:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise VoxtralError(f"{path}: not a readable audio file ({e})") from None
    if audio.shape[0] == 0:
        raise VoxtralError(f"{path}: the audio is empty")
    if audio.shape[1] > 1:
        log.info("%s: %d channels averaged to mono", path, audio.shape[1])
    mono = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        log.info("%s: resampled from %d Hz to %d Hz", path, rate, SAMPLE_RATE)
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if mono.shape[0] < MIN_SAMPLES:
        raise VoxtralError(f"{path}: {mono.shape[0]} samples is shorter than one {N_FFT}-sample frame")
    if not np.isfinite(mono).all():
        raise VoxtralError(f"{path}: the audio contains NaN or Inf samples")
    return mono


@functools.cache
def mel_filters(dtype: torch.dtype = torch.float32, n_mels: int = MEL_BINS) -> torch.Tensor:
    """[201, n_mels] Slaney-normalized mel filters, the ones WhisperFeatureExtractor builds (computed in float64)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank).to(dtype)


def power_spectrogram(waveform: torch.Tensor, center: bool = True) -> torch.Tensor:
    """|STFT|^2 of every frame, [..., 201, frames]: Hann window, N_FFT, HOP_LENGTH; `center` reflect-pads N_FFT / 2."""
    window = torch.hann_window(N_FFT, dtype=waveform.dtype)
    stft = torch.stft(waveform, N_FFT, HOP_LENGTH, window=window, center=center, return_complex=True)
    return stft.abs() ** 2


def normalized_log_mel(mel_power: torch.Tensor, log_max: float | None = None) -> torch.Tensor:
    """log10 of the mel power, floored at `log_max` - 8 (None: the maximum of all of `mel_power`), then (x + 4) / 4."""
    log_spec = torch.clamp(mel_power, min=LOG_CLAMP).log10()
    ceiling = log_spec.amax() if log_max is None else torch.tensor(log_max, dtype=log_spec.dtype)
    log_spec = torch.maximum(log_spec, ceiling - LOG_RANGE)
    return (log_spec + 4.0) / 4.0


def log_mel_windows(audio: np.ndarray, dtype: torch.dtype = torch.float32, n_mels: int = MEL_BINS) -> torch.Tensor:
    """Mono 16 kHz samples -> [N, n_mels, 3000] normalized log-mel windows, computed in `dtype`: float32 is
    WhisperFeatureExtractor's own arithmetic (bit for bit on one machine), float64 the same math on any machine."""
    n_windows = max(1, -(-len(audio) // WINDOW_SAMPLES))
    padded = np.zeros(n_windows * WINDOW_SAMPLES, dtype=np.float32)
    padded[: len(audio)] = audio
    power = power_spectrogram(torch.from_numpy(padded).to(dtype))[..., :-1].contiguous()  # Whisper drops the last
    log_spec = normalized_log_mel(mel_filters(dtype, n_mels).T @ power)  # the floor: whole-clip maximum
    return log_spec.reshape(n_mels, n_windows, MEL_FRAMES).transpose(0, 1).contiguous()


def speech_mel(audio_path: str | os.PathLike[str] | None = None, n_mels: int = MEL_BINS) -> torch.Tensor:
    """The first 30 s window of a clip (the built-in speech when None): [1, n_mels, 3000] float32, computed in float64
    and stored rounded (stable.py), so that every machine feeds the reference the same mel."""
    return stored_float32(log_mel_windows(load_audio(audio_path or builtin_speech_clip()), torch.float64, n_mels)[:1])
