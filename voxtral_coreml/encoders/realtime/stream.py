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

from voxtral_coreml.export.convert import OUTPUT_NAME
from voxtral_coreml.export.formats import format_of
from voxtral_coreml.pipeline.errors import VoxtralError

from .dims import STREAM_CHECK_FRAMES
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
        self.state = predictor.make_state() if info["form"] != "explicit" else None
        self.caches = (
            None
            if self.state is not None
            else {s["name"]: np.zeros(s["shape"], dtype=np.float16) for s in info["states"]}
        )

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
        outputs = (
            self.predictor.predict(inputs, state=self.state)
            if self.state is not None
            else self.predictor.predict(inputs)
        )
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


def load_streaming_model(backend: str, package: Path):
    """The package's step (predict and make_state): Core ML's on macOS, else the MIL runtime's. A multifunction
    package's default function is the step."""
    if backend == "coreml":
        from voxtral_coreml.check.backends import coreml_model

        return coreml_model(package)
    from voxtral_coreml.check.milrun import load_package

    return load_package(package)


def validate_streaming(package_dir, extracted_dir, gate_db: float, backend: str, audio=None) -> dict[str, object]:
    """Stream the validation clip through the package, tokens_per_step at a time, and compare with transformers'
    own streaming (`get_audio_features` with `padding_cache` and `cache`, fed the same chunks)."""
    from voxtral_coreml.check.validate import find_package
    from voxtral_coreml.numerics.metrics import compare_embeddings
    from voxtral_coreml.numerics.stable import float64
    from voxtral_coreml.sources.extract import load_extracted

    from .family import speech_window
    from .reference import RealtimeReference

    package, manifest = find_package(Path(package_dir))
    info = check_streaming(package, manifest)
    fmt = format_of(package.name)
    backend = fmt.resolve_backend(backend, "validation.backend")
    weights, dims, _ = load_extracted(extracted_dir)
    weights = {name: float64(w) for name, w in weights.items()}  # the same numbers on any machine (stable.py)
    step = info["mel_frames_per_step"]
    mel = speech_window(STREAM_CHECK_FRAMES // step * step, audio)
    expected = RealtimeReference(weights, dims).streaming_embeddings(float64(mel), info["tokens_per_step"]).float()
    with fmt.step_model(backend, package, info) as model:
        stream = stream_mel(model, info, mel, str(package))
    metrics: dict[str, object] = {
        **compare_embeddings(expected, stream.embeddings),
        "backend": backend,
        "gate_db": gate_db,
        "size_bytes": manifest["size_bytes"],
        "deployment_target": manifest["deployment_target"][fmt.target_key],
        "form": info["form"],
        "tokens_per_step": info["tokens_per_step"],
        "state_bytes": info["state_bytes"],
        "steps": len(stream.step_s),
        "output_shape": [1, info["tokens_per_step"], dims.hidden_size],
    }
    if metrics["psnr_db"] < gate_db:
        raise VoxtralError(
            f"{package}: streamed PSNR {metrics['psnr_db']} dB vs transformers' streaming is below the gate of "
            f"{gate_db} dB"
        )
    metrics["timings"] = {"median_step_s": round(sorted(stream.step_s)[len(stream.step_s) // 2], 4)}
    return metrics


__all__ = ["MAX_TOKENS", "Stream", "Streamer", "check_streaming", "load_streaming_model", "stream_mel"]
