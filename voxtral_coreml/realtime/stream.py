"""Drive a streaming package as an app does: k tokens (8k mel frames) per call, the state kept across calls.

The explicit form hands its state back as `next_*` outputs that the next call takes as inputs; the stateful
form keeps it in Core ML states (`make_state()` once per stream). `position` counts the tokens emitted so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..convert import OUTPUT_NAME
from ..errors import VoxtralError
from .export import CHUNK_NAME, NEXT_PREFIX, POSITION_NAME, STATE_NAMES
from .rope import MAX_TOKENS


@dataclass(frozen=True)
class Stream:
    embeddings: torch.Tensor  # [N, H] float32, one row per 80 ms
    step_s: tuple[float, ...]  # one package call per step


def check_streaming(package: Path, manifest: dict) -> dict:
    """The manifest's `streaming` entry, or one clear error for a package that cannot stream."""
    info = manifest.get("streaming")
    if not isinstance(info, dict):
        family = manifest.get("family", "2507")
        raise VoxtralError(
            f"{package}: not a streaming package (family {family}, {manifest.get('package')}); "
            "--stream needs a Voxtral Realtime streaming package (convert --streaming stateful|explicit)"
        )
    return info


class Streamer:
    """One stream through one loaded package: `step(mel_chunk)` -> [k, H]."""

    def __init__(self, predictor, info: dict, source: str) -> None:
        self.predictor = predictor
        self.info = info
        self.source = source
        self.position = 0
        self.state = predictor.make_state() if info["form"] == "stateful" else None
        self.caches = None if self.state is not None else {
            s["name"]: np.zeros(s["shape"], dtype=np.float16) for s in info["states"]
        }

    def step(self, mel_chunk: np.ndarray) -> np.ndarray:
        frames = self.info["mel_frames_per_step"]
        if mel_chunk.shape[-1] != frames:
            raise VoxtralError(f"{self.source}: a step takes {frames} mel frames, got {mel_chunk.shape[-1]}")
        k = self.info["tokens_per_step"]
        if self.position + k > self.info["max_tokens"]:
            raise VoxtralError(
                f"{self.source}: the stream reached {self.position} tokens; positions end at {self.info['max_tokens']} "
                f"({self.info['max_tokens'] * 80 / 3.6e6:.1f} h of audio): start a new stream"
            )
        inputs = {CHUNK_NAME: mel_chunk.astype(np.float32), POSITION_NAME: np.array([self.position], dtype=np.int32)}
        if self.caches is not None:
            inputs.update(self.caches)
        outputs = self.predictor.predict(inputs, state=self.state) if self.state is not None else self.predictor.predict(inputs)
        if self.caches is not None:
            self.caches = {n: np.asarray(outputs[NEXT_PREFIX + n]) for n in STATE_NAMES}
        self.position += k
        return np.asarray(outputs[OUTPUT_NAME], dtype=np.float32).reshape(k, -1)


def stream_mel(predictor, info: dict, mel: torch.Tensor, source: str) -> Stream:
    """A whole mel [1, M, T] through the package, step by step (T a multiple of the step's frames)."""
    frames = info["mel_frames_per_step"]
    if mel.shape[-1] % frames:
        raise VoxtralError(f"{source}: {mel.shape[-1]} mel frames is not a multiple of the step's {frames}")
    streamer = Streamer(predictor, info, source)
    rows, times = [], []
    for start in range(0, mel.shape[-1], frames):
        began = time.perf_counter()
        rows.append(streamer.step(mel[..., start : start + frames].numpy()))
        times.append(time.perf_counter() - began)
    return Stream(torch.from_numpy(np.concatenate(rows)), tuple(times))


__all__ = ["MAX_TOKENS", "Stream", "Streamer", "check_streaming", "stream_mel"]
