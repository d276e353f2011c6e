"""The Voxtral Realtime family: its entry in `families.FAMILIES`."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch

from voxtral_coreml.pipeline.errors import VoxtralError

from .dims import SLIDING_WINDOW, RealtimeDims
from .layouts import LAYOUTS, is_realtime_hf, is_realtime_mistral

__all__ = [
    "LAYOUTS",
    "calibrate",
    "calibration_encoder",
    "compute_reference",
    "convert_package",
    "detect",
    "io_contract",
]

log = logging.getLogger(__name__)

dims_from_json = RealtimeDims.from_json


def detect(root: Path) -> bool:
    return root.is_dir() and (is_realtime_hf(root) or is_realtime_mistral(root))


def speech_window(frames: int, audio: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """[1, 128, frames] Realtime features of a clip (the built-in speech when None), repeated or cut to length."""
    from voxtral_coreml.features.logmel import HOP_LENGTH, builtin_speech_clip, load_audio

    from .features import realtime_log_mel

    samples, n = load_audio(audio or builtin_speech_clip()), frames * HOP_LENGTH
    return realtime_log_mel(np.tile(samples, -(-n // len(samples)))[:n])[None].contiguous()


def write_synthetic(out_dir: Path, source: dict, where: str) -> None:
    """A Realtime synthetic checkpoint from `models.<model>.source`: dims (d_model, n_layers, n_heads, head_dim,
    hidden_size, optional ffn_dim, rope_theta, sliding_window), seed, layout (hf or mistral)."""
    from .synthetic import write_realtime_checkpoint, write_realtime_mistral_checkpoint

    d = source.get("dims")
    if not isinstance(d, dict):
        raise VoxtralError(f"{where}: missing 'dims'")
    try:
        dims = RealtimeDims(
            d_model=int(d["d_model"]),
            n_layers=int(d["n_layers"]),
            n_heads=int(d["n_heads"]),
            head_dim=int(d["head_dim"]),
            ffn_dim=int(d.get("ffn_dim", 4 * int(d["d_model"]))),
            hidden_size=int(d["hidden_size"]),
            rope_theta=float(d["rope_theta"]),
            sliding_window=int(d.get("sliding_window", SLIDING_WINDOW)),
        )
    except KeyError as e:
        raise VoxtralError(f"{where}.dims: missing {e}") from None
    seed = source.get("seed")
    if not isinstance(seed, int):
        raise VoxtralError(f"{where}: 'seed' must be an integer, got {seed!r}")
    writers = {"hf": write_realtime_checkpoint, "mistral": write_realtime_mistral_checkpoint}
    layout = source.get("layout", "hf")
    if layout not in writers:
        raise VoxtralError(f"{where}.layout: {layout!r}; synthetic Realtime checkpoints are {' or '.join(writers)}")
    writers[layout](out_dir, dims, seed)


def compute_reference(extracted_dir, audio, attention: str, query_chunk: int):
    """transformers' and the ANE module's embeddings on the offline window of speech, and their parity: both in
    float64 (transformers keeps RMSNorm and RoPE angles in fp32), stored as float32 on a fixed grid (stable.py)."""
    from voxtral_coreml.numerics.metrics import compare_embeddings
    from voxtral_coreml.numerics.stable import FLOAT64_RESOLUTION_DB, float64, stored_float32
    from voxtral_coreml.sources.extract import load_extracted

    from .model import build_offline_encoder
    from .reference import RealtimeReference

    weights, dims, _ = load_extracted(extracted_dir)
    weights = {name: float64(w) for name, w in weights.items()}
    mel = speech_window(dims.mel_frames, audio)
    log.info("reference: transformers forward (Realtime, %d layers, d_model %d)", dims.n_layers, dims.d_model)
    expected = RealtimeReference(weights, dims).audio_embeddings(float64(mel))[None]
    log.info("reference: ANE module forward")
    with torch.inference_mode():
        ane = build_offline_encoder(weights, dims, attention, query_chunk)(float64(mel)).reshape(expected.shape)
    tensors = {"mel": mel, "transformers": stored_float32(expected), "ane_module": stored_float32(ane)}
    return tensors, compare_embeddings(expected, ane, resolution_db=FLOAT64_RESOLUTION_DB)


def calibration_encoder(extracted_dir, frames: int, audio=None):
    """The offline module with fp16-rounded weights on the first `frames` mel frames of speech, and that mel."""
    from voxtral_coreml.export.sensitivity import SIM_ATTENTION
    from voxtral_coreml.sources.extract import load_extracted

    from .model import build_offline_encoder

    weights, dims, _ = load_extracted(extracted_dir)
    if not 0 < frames <= dims.mel_frames:
        raise VoxtralError(f"sensitivity: frames {frames} is outside 1..{dims.mel_frames}")
    short = dataclasses.replace(dims, mel_frames=frames)
    weights = {n: w.to(torch.float16).float() for n, w in weights.items()}
    return build_offline_encoder(weights, short, SIM_ATTENTION), speech_window(frames, audio)


def calibrate(extracted_dir, recipe, jobs: int = 1):
    """A data-aware recipe's compressed weights (calibration.py): the offline module's, shared by the step."""
    from .calibration import calibrate

    return calibrate(extracted_dir, recipe, jobs)


def convert_package(*args, **kwargs):
    from .export import convert_package

    return convert_package(*args, **kwargs)


def convert_asset(*args, **kwargs):
    """The Core AI export (formats.py's coreai): the offline window, or the step as a stateful function."""
    from .coreai import convert_asset

    return convert_asset(*args, **kwargs)


def encode(samples, package: Path, manifest: dict, backend: str, stream: bool, progress: bool):
    """Realtime audio -> Encoding: the offline window, or (`stream`) the streaming package step by step."""
    from voxtral_coreml.encode import Encoding
    from voxtral_coreml.features.logmel import SAMPLE_RATE

    from .encode import encode_offline, encode_streaming

    streaming = "streaming" in manifest
    if streaming != stream:
        hint = "pass --stream" if streaming else "--stream needs a streaming package (convert --streaming ...)"
        raise VoxtralError(f"{package}: a {'streaming' if streaming else 'offline'} Realtime package: {hint}")
    seconds = len(samples) / SAMPLE_RATE
    if not stream:
        embeddings, load_s, calls = encode_offline(samples, package, manifest, backend)
        return Encoding(
            embeddings,
            seconds,
            backend,
            load_s,
            calls,
            f"window of {calls and manifest['inputs'][0]['shape'][-1] / 100:.0f} s",
        )
    report = (lambda i, s: print(f"step {i}: {s * 1000:.1f} ms", flush=True)) if progress else None
    embeddings, load_s, steps = encode_streaming(samples, package, manifest, backend, report)
    k = manifest["streaming"]["tokens_per_step"]
    return Encoding(embeddings, seconds, backend, load_s, steps, f"step of {k * 80} ms")


CANNOT_STREAM = None  # causal: the step function streams


def choose_variant(flag: str | None, extracted_dir, out: Path) -> str:
    return flag or "Realtime"


def package_name(variant: str | None = None, streaming: dict | None = None) -> str:
    from .export import OFFLINE_PACKAGE, STREAMING_PACKAGE

    return OFFLINE_PACKAGE if streaming is None else STREAMING_PACKAGE


def io_contract(dims: RealtimeDims, manifest: dict | None = None) -> dict:
    from .export import io_contract

    return io_contract(dims, manifest)
