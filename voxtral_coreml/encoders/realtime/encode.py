"""Audio of any length -> Realtime audio embeddings [N, H], one row per 80 ms of audio.

- offline package: the clip's features (`realtime_log_mel`, fixed log floor, no 30 s padding) in one call of the
  package's window; the tail is zero audio, which a causal encoder never looks back from. Longer clips need the
  streaming package.
- streaming package (`--stream`): the clip fed as a microphone would, `tokens_per_step` x 80 ms per call, the
  features computed incrementally (`StreamingLogMel`), the state kept across calls.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from voxtral_coreml.export.convert import INPUT_NAME, OUTPUT_NAME
from voxtral_coreml.export.formats import format_of
from voxtral_coreml.pipeline.errors import VoxtralError

from .features import SAMPLES_PER_TOKEN, StreamingLogMel, realtime_log_mel
from .stream import Streamer, check_streaming

MICROPHONE_PIECE = SAMPLES_PER_TOKEN  # the CLI's simulated microphone delivers 80 ms at a time


def tokens_of(n_samples: int) -> int:
    return -(-n_samples // SAMPLES_PER_TOKEN)


def padded(samples: np.ndarray, multiple: int) -> np.ndarray:
    out = np.zeros(-(-len(samples) // multiple) * multiple, dtype=np.float32)
    out[: len(samples)] = samples
    return out


def encode_offline(samples: np.ndarray, package: Path, manifest: dict, backend: str):
    """(embeddings [N, H], load_s, (call_s,)) from the offline window package."""
    frames = manifest["inputs"][0]["shape"][-1]
    n_tokens = tokens_of(len(samples))
    window_tokens = manifest["outputs"][0]["shape"][1]
    if n_tokens > window_tokens:
        raise VoxtralError(
            f"{package}: the clip needs {n_tokens} tokens ({len(samples) / 16000:.1f} s) and this offline package "
            f"holds {window_tokens} ({frames / 100:.0f} s); use a streaming package with --stream for longer audio"
        )
    window = np.zeros(frames * 160, dtype=np.float32)
    window[: len(samples)] = samples
    mel = realtime_log_mel(window)[None]
    started = time.perf_counter()
    with format_of(package.name).predictor(backend, package) as predict:
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        out = np.asarray(predict({INPUT_NAME: mel.numpy()})[OUTPUT_NAME], dtype=np.float32)
        call_s = time.perf_counter() - started
    return torch.from_numpy(out.reshape(-1, out.shape[-1])[:n_tokens].copy()), load_s, (call_s,)


def encode_streaming(samples: np.ndarray, package: Path, manifest: dict, backend: str, progress=None):
    """(embeddings [N, H], load_s, per-step seconds) feeding the clip 80 ms at a time through the step package."""
    info = check_streaming(package, manifest)
    n_tokens = tokens_of(len(samples))
    audio = padded(samples, info["tokens_per_step"] * SAMPLES_PER_TOKEN)  # the stream ends in silence to a step
    started = time.perf_counter()
    with format_of(package.name).step_model(backend, package, info) as model:
        streamer = Streamer(model, info, str(package))
        load_s = time.perf_counter() - started
        rows, step_s = feed_microphone(streamer, audio, progress)
    return torch.from_numpy(np.concatenate(rows)[:n_tokens].copy()), load_s, tuple(step_s)


def feed_microphone(streamer: Streamer, audio: np.ndarray, progress=None) -> tuple[list[np.ndarray], list[float]]:
    """The audio in 80 ms pieces as a microphone delivers it: features computed incrementally, a step per chunk."""
    features = StreamingLogMel(tokens_per_chunk=streamer.info["tokens_per_step"])
    rows, step_s = [], []

    def run(chunks: list[torch.Tensor]) -> None:
        for chunk in chunks:
            began = time.perf_counter()
            rows.append(streamer.step(chunk[None].numpy()))
            step_s.append(time.perf_counter() - began)
            if progress is not None:
                progress(len(step_s), step_s[-1])

    for start in range(0, len(audio), MICROPHONE_PIECE):
        run(features.push(audio[start : start + MICROPHONE_PIECE]))
    run([c for c in features.flush() if c.shape[-1] == streamer.info["mel_frames_per_step"]])
    return rows, step_s
