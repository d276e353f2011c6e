"""Audio of any length -> Voxtral audio embeddings with an encoder package, one call per 30 s window.

The features are VoxtralProcessor's (`features.log_mel_windows`: the log floor over the whole clip), so the
embeddings are the ones transformers would give the language model: `[N * 375, H]`, chunk-major.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_path
from .convert import INPUT_NAME, OUTPUT_NAME
from .errors import VoxtralError
from .features import SAMPLE_RATE, load_audio, log_mel_windows
from .formats import format_of
from .safetensors_io import TensorSpec, write_safetensors
from .validate import find_package

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".npy", ".safetensors")


@dataclass(frozen=True)
class Encoding:
    embeddings: torch.Tensor  # [N * 375, H] float32, window after window
    seconds: float  # the audio's duration
    backend: str
    runtime: str  # what the backend stands for: which runtime ran the package
    load_s: float
    window_s: tuple[float, ...]  # one package call per window


def check_output_path(out: Path) -> None:
    """Refuse an unknown format before any work is done."""
    if out.suffix not in OUTPUT_FORMATS:
        suffix = out.suffix or "(none)"
        raise VoxtralError(f"{out}: unknown output format {suffix!r}; use {' or '.join(OUTPUT_FORMATS)}")


def encoder_package(path: Path) -> Path:
    package, manifest = find_package(path)
    outputs = [o.get("name") for o in manifest.get("outputs", [])]
    if outputs != [OUTPUT_NAME]:
        raise VoxtralError(f"{package}: not an encoder package (outputs {outputs}, expected ['{OUTPUT_NAME}'])")
    return package


def encode_audio(
    audio: str | os.PathLike[str], package: str | os.PathLike[str], backend: str = "auto", progress: bool = True
) -> Encoding:
    """Load the audio, cut its log-mel into 30 s windows and run each through the package."""
    package = encoder_package(Path(package))
    fmt = format_of(package.name)
    backend = fmt.resolve_backend(backend, "--backend")
    samples = load_audio(audio)
    windows = log_mel_windows(samples)
    started = time.perf_counter()
    with fmt.predictor(backend, package) as predict:
        load_s = time.perf_counter() - started
        chunks, window_s = [], []
        for window in tqdm(windows, desc=Path(audio).name, unit="window", disable=not progress):
            started = time.perf_counter()
            output = predict({INPUT_NAME: window[None].numpy()})[OUTPUT_NAME]
            window_s.append(time.perf_counter() - started)
            chunks.append(torch.from_numpy(np.asarray(output, dtype=np.float32)).reshape(-1, output.shape[-1]))
    seconds = len(samples) / SAMPLE_RATE
    return Encoding(torch.cat(chunks), seconds, backend, fmt.runtime(backend), load_s, tuple(window_s))


def save_embeddings(out: Path, embeddings: torch.Tensor) -> None:
    """`.npy` or `.safetensors` (tensor `audio_embeddings`), by the extension; written atomically."""
    check_output_path(out)
    embeddings = embeddings.contiguous()
    with atomic_path(out) as staging:
        if out.suffix == ".npy":
            with open(staging, "wb") as f:  # a file object: np.save would append .npy to a path
                np.save(f, embeddings.numpy())
        else:
            spec = TensorSpec(OUTPUT_NAME, embeddings.dtype, tuple(embeddings.shape))
            write_safetensors(staging, [spec], lambda _: embeddings)


def summary(encoding: Encoding) -> str:
    e, n = encoding.embeddings, len(encoding.window_s)
    per_window = sum(encoding.window_s) / n
    return (
        f"audio_embeddings {list(e.shape)} float32 from {encoding.seconds:.1f} s of audio "
        f"({n} window{'s' if n > 1 else ''} of 30 s); "
        f"mean {e.mean().item():.4g}, std {e.std().item():.4g}, min {e.min().item():.4g}, max {e.max().item():.4g}; "
        f"{encoding.backend} ({encoding.runtime}): load {encoding.load_s:.2f} s, {per_window:.2f} s per window"
    )
