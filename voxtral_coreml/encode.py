"""Audio of any length -> Voxtral audio embeddings with an encoder package, one call per 30 s window.

The features are VoxtralProcessor's (`features.log_mel_windows`: the log floor over the whole clip), so the
embeddings are the ones transformers would give the language model: `[N * 375, H]`, chunk-major.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from voxtral_coreml.check.validate import find_package
from voxtral_coreml.encoders.families import family_module, family_of
from voxtral_coreml.export.convert import INPUT_NAME, OUTPUT_NAME
from voxtral_coreml.export.formats import format_of
from voxtral_coreml.features.logmel import SAMPLE_RATE, load_audio, log_mel_windows
from voxtral_coreml.pipeline.atomic import atomic_path
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.safetensors_io import TensorSpec, write_safetensors

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".npy", ".safetensors")


@dataclass(frozen=True)
class Encoding:
    embeddings: torch.Tensor  # [N * 375, H] float32, window after window
    seconds: float  # the audio's duration
    backend: str
    load_s: float
    window_s: tuple[float, ...]  # one package call per window (per step for a streaming package)
    call: str = "window of 30 s"  # what one package call covers
    runtime: str = ""  # which runtime the backend stands for (encode_audio sets it from the package's format)


def check_output_path(out: Path) -> None:
    """Refuse an unknown format before any work is done."""
    if out.suffix not in OUTPUT_FORMATS:
        suffix = out.suffix or "(none)"
        raise VoxtralError(f"{out}: unknown output format {suffix!r}; use {' or '.join(OUTPUT_FORMATS)}")


def encoder_package(path: Path) -> tuple[Path, dict]:
    package, manifest = find_package(path)
    outputs = [o.get("name") for o in manifest.get("outputs", [])]
    if outputs[:1] != [OUTPUT_NAME]:
        raise VoxtralError(f"{package}: not an encoder package (outputs {outputs}, expected ['{OUTPUT_NAME}'])")
    return package, manifest


def mel_bins(package: Path, manifest: dict) -> int:
    """A 2507 package's mel bins: the features follow its input, [1, n_mels, 3000] (128 for Voxtral, 80 for
    Whisper base's trained encoder)."""
    inputs = manifest["inputs"]  # read_manifest checked each is {name, shape, dtype}
    if len(inputs) != 1 or inputs[0]["name"] != INPUT_NAME or len(inputs[0]["shape"]) != 3:
        raise VoxtralError(f"{package}: inputs {inputs} are not one '{INPUT_NAME}' [1, n_mels, frames]")
    return inputs[0]["shape"][1]


def encode_audio(
    audio: str | os.PathLike[str],
    package: str | os.PathLike[str],
    backend: str = "auto",
    progress: bool = True,
    stream: bool = False,
) -> Encoding:
    """Load the audio and run it through the package as its family does: 30 s windows for 2507, one window or
    a stream of 80 ms steps (`stream`) for Realtime; by the runtime of the package's format."""
    package, manifest = encoder_package(Path(package))
    fmt = format_of(package.name)
    backend = fmt.resolve_backend(backend, "--backend")
    samples = load_audio(audio)
    encoding = family_module(family_of(manifest)).encode(samples, package, manifest, backend, stream, progress)
    return dataclasses.replace(encoding, runtime=fmt.runtime(backend))


def encode_windows(samples: np.ndarray, package: Path, manifest: dict, backend: str, stream: bool, progress: bool):
    """The 2507 encoders: the clip's log-mel cut into 30 s windows, one package call each."""
    if stream:
        from voxtral_coreml.encoders.realtime.stream import check_streaming

        check_streaming(package, manifest)  # raises: 2507 packages cannot stream
    windows = log_mel_windows(samples, n_mels=mel_bins(package, manifest))
    started = time.perf_counter()
    with format_of(package.name).predictor(backend, package) as predict:
        load_s = time.perf_counter() - started
        chunks, window_s = [], []
        for window in tqdm(windows, desc=package.name, unit="window", disable=not progress):
            started = time.perf_counter()
            output = predict({INPUT_NAME: window[None].numpy()})[OUTPUT_NAME]
            window_s.append(time.perf_counter() - started)
            chunks.append(torch.from_numpy(np.asarray(output, dtype=np.float32)).reshape(-1, output.shape[-1]))
    return Encoding(torch.cat(chunks), len(samples) / SAMPLE_RATE, backend, load_s, tuple(window_s))


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
    per_call = sum(encoding.window_s) / n
    unit, _, extent = encoding.call.partition(" ")  # "window of 30 s": one package call covers that
    calls = f"{n} {unit}{'s' if n > 1 else ''} {extent}"
    return (
        f"audio_embeddings {list(e.shape)} float32 from {encoding.seconds:.1f} s of audio ({calls}); "
        f"mean {e.mean().item():.4g}, std {e.std().item():.4g}, min {e.min().item():.4g}, max {e.max().item():.4g}; "
        f"{encoding.backend} ({encoding.runtime}): load {encoding.load_s:.2f} s, {per_call:.2f} s per {unit}"
    )
