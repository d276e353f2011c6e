"""The mel front-end as a Core ML package: 30 s of 16 kHz PCM -> one normalized log-mel window.

`VoxtralMelSpectrogram.mlpackage` takes `audio` float32 [1, 480000] and returns `mel_spectrogram` float32
[1, 128, 3000], the encoder package's input, so an app can chain the two without an FFT of its own.
The STFT is a strided convolution with fixed DFT kernels (Hann window folded in); the reflect padding of
torch.stft(center=True) is a slice times a fixed exchange matrix (a permutation: exact in fp16 as well, and
no `reverse` op, which the MIL runtime lacks). Its limit: each window is computed alone. The log floor
(max - 8) is this window's, and the edge frames read reflected samples, while VoxtralProcessor floors over
the whole clip and runs one STFT across window boundaries (see `features.log_mel_windows`).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxtral_coreml import __version__
from voxtral_coreml.check.backends import load_predictor, resolve_backend
from voxtral_coreml.check.validate import check_structure, find_package
from voxtral_coreml.encoders.dims import MEL_BINS, MEL_FRAMES
from voxtral_coreml.export.canonical import canonicalize_package
from voxtral_coreml.export.convert import INPUT_NAME as MEL_NAME
from voxtral_coreml.export.convert import coremltools_writes, tree_size, versions, write_manifest
from voxtral_coreml.export.package_info import package_structure
from voxtral_coreml.export.recipes import TARGETS
from voxtral_coreml.numerics.metrics import ERROR_DIGITS, PSNR_DECIMALS, psnr_db
from voxtral_coreml.numerics.stable import round_decimals, round_significant
from voxtral_coreml.pipeline.atomic import atomic_path
from voxtral_coreml.pipeline.errors import VoxtralError

from .logmel import (
    HOP_LENGTH,
    N_FFT,
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    builtin_speech_clip,
    load_audio,
    log_mel_windows,
    mel_filters,
    normalized_log_mel,
)

log = logging.getLogger(__name__)

PACKAGE_NAME = "VoxtralMelSpectrogram.mlpackage"
AUDIO_NAME = "audio"
PRECISIONS = ("fp32", "fp16")
N_BINS = N_FFT // 2 + 1
CENTER_PAD = N_FFT // 2  # torch.stft(center=True) pads n_fft // 2 on each side
# Whisper drops the STFT's last frame: the 3000 frames kept read this many reflected samples past the end.
RIGHT_PAD = (MEL_FRAMES - 1) * HOP_LENGTH + N_FFT - CENTER_PAD - WINDOW_SAMPLES


def dft_kernels() -> torch.Tensor:
    """[2 * 201, 1, 400]: Hann-windowed cos (real part) then -sin (imaginary part) of each frequency bin."""
    n = torch.arange(N_FFT, dtype=torch.float64)
    k = torch.arange(N_BINS, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / N_FFT
    window = torch.hann_window(N_FFT, dtype=torch.float64)  # periodic, as WhisperFeatureExtractor's
    kernels = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])
    return kernels[:, None, :].float()


def exchange_matrix(size: int) -> torch.Tensor:
    """x @ J reverses the last axis of x: J is the identity with its columns reversed."""
    return torch.eye(size).flip(1).contiguous()


class MelSpectrogram(nn.Module):
    """PCM [1, 480000] -> [1, 128, 3000]: WhisperFeatureExtractor's log-mel with the floor over this window."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dft", dft_kernels())
        self.register_buffer("filters", mel_filters().T.contiguous())  # [128, 201]
        self.register_buffer("flip_left", exchange_matrix(CENTER_PAD))
        self.register_buffer("flip_right", exchange_matrix(RIGHT_PAD))

    def reflect_pad(self, audio: torch.Tensor) -> torch.Tensor:
        """torch.stft's center padding (reflect, edge sample not repeated), only as far as 3000 frames read."""
        left = audio[:, 1 : CENTER_PAD + 1] @ self.flip_left
        right = audio[:, -RIGHT_PAD - 1 : -1] @ self.flip_right
        return torch.cat([left, audio, right], dim=1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        frames = nn.functional.conv1d(self.reflect_pad(audio)[:, None, :], self.dft, stride=HOP_LENGTH)
        real, imag = frames[:, :N_BINS], frames[:, N_BINS:]
        power = real * real + imag * imag  # [1, 201, 3000]
        return normalized_log_mel(self.filters @ power)  # the floor: this window's maximum


def convert_mel(precision: str, target: str):
    import coremltools as ct

    example = torch.zeros(1, WINDOW_SAMPLES)
    with torch.no_grad():
        exported = torch.export.export(MelSpectrogram().eval(), (example,)).run_decompositions({})
    compute = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}[precision]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coremltools warns about the untested torch version on every call
        return ct.convert(
            exported,
            inputs=[ct.TensorType(name=AUDIO_NAME, shape=(1, WINDOW_SAMPLES), dtype=np.float32)],
            outputs=[ct.TensorType(name=MEL_NAME, dtype=np.float32)],
            convert_to="mlprogram",
            compute_precision=compute,
            minimum_deployment_target=getattr(ct.target, target),
            skip_model_load=True,  # loading compiles the model, which only macOS can do
        )


def mel_io_contract() -> dict[str, list[dict[str, object]]]:
    return {
        "inputs": [{"name": AUDIO_NAME, "shape": [1, WINDOW_SAMPLES], "dtype": "float32"}],
        "outputs": [{"name": MEL_NAME, "shape": [1, MEL_BINS, MEL_FRAMES], "dtype": "float32"}],
    }


def convert_mel_package(package: str | os.PathLike[str], precision: str, target: str = "iOS16") -> dict:
    """Write the mel `.mlpackage` at `package` and `manifest.json` beside it, each atomically (manifest last)."""
    started = time.monotonic()
    package = Path(package)
    if precision not in PRECISIONS:
        raise VoxtralError(f"mel compute precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise VoxtralError(f"mel deployment target {target!r}: choose one of {', '.join(TARGETS)}")
    with coremltools_writes(package):
        mlmodel = convert_mel(precision, target)
    mlmodel.short_description = f"Voxtral log-mel front-end: 30 s of 16 kHz audio -> [1,128,3000] ({precision})"
    mlmodel.version = __version__
    with atomic_path(package) as staging:
        mlmodel.save(str(staging))
        canonicalize_package(staging)
    ios, macos = TARGETS[target]
    manifest = {
        "package": package.name,
        "kind": "mel_frontend",
        "compute_precision": precision,
        **mel_io_contract(),
        "deployment_target": {"coreml": target, "ios": ios, "macos": macos},
        "features": {
            "sampling_rate": SAMPLE_RATE,
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "mel_bins": MEL_BINS,
            "log_floor": "per_window",  # VoxtralProcessor's is per clip: equal for clips up to 30 s
        },
        "size_bytes": tree_size(package),
        "versions": versions(),
    }
    write_manifest(package, manifest, started)
    return manifest


def pcm_window(samples: np.ndarray) -> np.ndarray:
    """The package's input: up to 30 s of samples, zero-padded to [1, 480000] float32."""
    pcm = np.zeros((1, WINDOW_SAMPLES), dtype=np.float32)
    pcm[0, : min(len(samples), WINDOW_SAMPLES)] = samples[:WINDOW_SAMPLES]
    return pcm


def validate_mel_package(
    package_dir: str | os.PathLike[str],
    audio: str | os.PathLike[str] | None,
    gate_db: float,
    backend: str = "auto",
) -> dict[str, object]:
    """The package's mel vs transformers' WhisperFeatureExtractor on the clip's first 30 s (the built-in speech
    when `audio` is None); raises VoxtralError when it breaks the contract or falls below the gate.

    The expected mel is WhisperFeatureExtractor's math in float64 (`log_mel_windows`, equal to it in float32), so
    that the metrics are the same on any machine (stable.py)."""
    package, manifest = find_package(Path(package_dir))
    structure = package_structure(package)
    check_structure(package, manifest, structure, mel_io_contract())
    backend = resolve_backend(backend)
    # The first 30 s alone: one window, whose floor the processor and the package take over the same samples.
    samples = load_audio(audio or builtin_speech_clip())[:WINDOW_SAMPLES]
    expected = log_mel_windows(samples, torch.float64)[0]
    started = time.perf_counter()
    predict = load_predictor(backend, package)
    loaded = time.perf_counter()
    mel = torch.from_numpy(np.asarray(predict({AUDIO_NAME: pcm_window(samples)})[MEL_NAME], dtype=np.float32))
    finished = time.perf_counter()
    metrics: dict[str, object] = {
        "psnr_db": round_decimals(psnr_db(expected, mel), PSNR_DECIMALS),
        "max_abs_err": round_significant((expected - mel[0]).abs().max().item(), ERROR_DIGITS),
        "backend": backend,
        "gate_db": gate_db,
        "compute_precision": manifest.get("compute_precision"),
        "size_bytes": manifest.get("size_bytes"),
        "deployment_target": manifest["deployment_target"]["coreml"],
        "ops_total": sum(structure["ops"].values()),
        "timings": {"load_s": round(loaded - started, 3), "predict_s": round(finished - loaded, 3)},
    }
    if metrics["psnr_db"] < gate_db:
        raise VoxtralError(
            f"{package}: PSNR {metrics['psnr_db']} dB vs WhisperFeatureExtractor is below the gate of {gate_db} dB "
            f"(max_abs_err {metrics['max_abs_err']})"
        )
    return metrics
