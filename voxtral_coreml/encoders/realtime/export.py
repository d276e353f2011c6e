"""Realtime modules -> Core ML packages: the offline window, and the streaming step in two forms.

- offline: `mel_spectrogram` [1, M, F] -> `audio_embeddings` [1, F/8, H]: the first call of a stream.
- stateful step (iOS 18): `mel_chunk` [1, M, 8k] + `position` (int32 tokens so far) -> `audio_embeddings`
  [1, k, H]; the convs' contexts and the key/value ring buffers are Core ML states that never leave the device.
- explicit step (iOS 16): the same, with the state as fp16 inputs and `next_*` outputs the app feeds back.

torch.export traces with fake tensors; mutated buffers become Core ML states (coremltools 9).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxtral_coreml import __version__
from voxtral_coreml.export.canonical import canonicalize_package
from voxtral_coreml.export.compress import compress_mlmodel
from voxtral_coreml.export.convert import (
    INPUT_NAME,
    OUTPUT_NAME,
    build_facts,
    check_cached_inputs,
    coremltools_writes,
    encoder_mlprogram,
    package_manifest,
    write_manifest,
)
from voxtral_coreml.export.mlprogram import convert_module
from voxtral_coreml.export.recipes import TARGETS, Recipe
from voxtral_coreml.export.torch_compress import apply_compressed, torch_compression_info
from voxtral_coreml.features.logmel import HOP_LENGTH, SAMPLE_RATE
from voxtral_coreml.pipeline.atomic import atomic_path
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted

from .dims import MEL_FRAMES_PER_TOKEN, RealtimeDims
from .model import build_offline_encoder, build_step_encoder, initial_state, mel_frames_per_step
from .rope import MAX_TOKENS

log = logging.getLogger(__name__)

OFFLINE_PACKAGE = "VoxtralRealtimeEncoder.mlpackage"
STREAMING_PACKAGE = "VoxtralRealtimeStreaming.mlpackage"
CHUNK_NAME = "mel_chunk"
POSITION_NAME = "position"
STATE_NAMES = ("conv1_context", "conv2_context", "key_cache", "value_cache")
NEXT_PREFIX = "next_"  # the explicit form's state outputs
# streaming form -> the lowest target that runs it. multifunction: the offline window (function "offline") and the
# stateful step (function "step", the default) in one package, weights stored once (multifunction needs iOS 18).
FORMS = {"stateful": "iOS18", "explicit": "iOS16", "multifunction": "iOS18"}
OFFLINE_FUNCTION, STEP_FUNCTION = "offline", "step"


def _io(name: str, shape, dtype: str) -> dict[str, object]:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def state_shapes(dims: RealtimeDims) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in initial_state(dims).items()}


def io_contract(dims: RealtimeDims, manifest: dict | None = None) -> dict[str, list[dict[str, object]]]:
    """The offline package's I/O, or the streaming package's when the manifest says so."""
    streaming = (manifest or {}).get("streaming")
    if not streaming:
        return {
            "inputs": [_io(INPUT_NAME, (1, dims.n_mels, dims.mel_frames), "float32")],
            "outputs": [_io(OUTPUT_NAME, (1, dims.n_embeddings, dims.hidden_size), "float32")],
        }
    k = streaming["tokens_per_step"]
    inputs = [_io(CHUNK_NAME, (1, dims.n_mels, mel_frames_per_step(k)), "float32"), _io(POSITION_NAME, (1,), "int32")]
    outputs = [_io(OUTPUT_NAME, (1, k, dims.hidden_size), "float32")]
    if streaming["form"] == "explicit":
        shapes = state_shapes(dims)
        inputs += [_io(n, shapes[n], "float16") for n in STATE_NAMES]
        outputs += [_io(NEXT_PREFIX + n, shapes[n], "float16") for n in STATE_NAMES]
    return {"inputs": inputs, "outputs": outputs}


class StatefulStep(nn.Module):
    """The step with its state as buffers it updates in place: coremltools makes each a Core ML state."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step
        for name, value in initial_state(step.dims).items():
            self.register_buffer(name, value)

    def forward(self, mel_chunk: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        states = [getattr(self, n) for n in STATE_NAMES]
        embeddings, *updated = self.step(mel_chunk, position, *states)
        for state, value in zip(states, updated, strict=True):
            state.copy_(value)
        return embeddings


def _later(a: str, b: str) -> str:
    return max(a, b, key=list(TARGETS).index)


def to_mlprogram(
    weights, dims: RealtimeDims, target: str, streaming: dict | None, attention: str, query_chunk: int, calibrated=None
):
    """The offline window (streaming None) or the step as an mlprogram; `calibrated` (a data-aware recipe's
    compressed weights and coremltools' metadata) is applied to the module first, so ct.convert emits its ops."""
    import coremltools as ct

    def with_calibration(module: nn.Module) -> nn.Module:
        if calibrated is not None:
            apply_compressed(module, calibrated)
        return module

    if streaming is None:
        build = functools.partial(build_offline_encoder, attention=attention, query_chunk=query_chunk)
        compressed = None if calibrated is None else with_calibration(build(weights, dims))
        return encoder_mlprogram(weights, dims, build, target, compressed)
    contract = io_contract(dims, {"streaming": streaming})
    tensor = {"float32": np.float32, "float16": np.float16, "int32": np.int32}
    inputs = [ct.TensorType(name=i["name"], shape=i["shape"], dtype=tensor[i["dtype"]]) for i in contract["inputs"]]
    outputs = [ct.TensorType(name=o["name"], dtype=tensor[o["dtype"]]) for o in contract["outputs"]]
    examples = tuple(
        torch.zeros(
            i["shape"], dtype={"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}[i["dtype"]]
        )
        for i in contract["inputs"]
    )
    if streaming["form"] == "multifunction":
        raise ValueError("a multifunction package is two programs: see save_multifunction_package")
    if streaming["form"] == "explicit":
        step = with_calibration(build_step_encoder(weights, dims, streaming["tokens_per_step"], attention, query_chunk))
        return convert_module(step, examples, inputs, outputs, target)
    # coremltools 9 lifts the weights of a stateful program to fp32 whatever their dtype: give it fp32 (the fp16
    # compute precision stores them as fp16 all the same); the states stay fp16, as Core ML requires.
    step = with_calibration(
        build_step_encoder(
            {n: w.float() for n, w in weights.items()}, dims, streaming["tokens_per_step"], attention, query_chunk
        )
    )
    shapes = state_shapes(dims)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shapes[n], dtype=np.float16), name=n) for n in STATE_NAMES]
    return convert_module(StatefulStep(step), examples, inputs, outputs, target, states)


def save_multifunction_package(program, info: dict, staging: Path) -> dict:
    """The offline window and the stateful step as two functions of one package (equal weights stored once:
    coremltools deduplicates equal constants). `program(streaming)` converts and compresses one function."""
    import tempfile

    import coremltools as ct

    with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
        offline, compression = program(None)
        offline.save(f"{tmp}/offline.mlpackage")
        step, _ = program({**info, "form": "stateful"})
        step.save(f"{tmp}/step.mlpackage")
        descriptor = ct.utils.MultiFunctionDescriptor()
        descriptor.add_function(
            f"{tmp}/offline.mlpackage", src_function_name="main", target_function_name=OFFLINE_FUNCTION
        )
        descriptor.add_function(f"{tmp}/step.mlpackage", src_function_name="main", target_function_name=STEP_FUNCTION)
        descriptor.default_function_name = STEP_FUNCTION
        ct.utils.save_multifunction(descriptor, str(staging))
    return compression


def streaming_info(dims: RealtimeDims, form: str, tokens_per_step: int) -> dict[str, object]:
    """What an app must know to drive the step: the manifest's `streaming` entry."""
    if form not in FORMS:
        raise VoxtralError(f"streaming form {form!r}: choose one of {', '.join(FORMS)}")
    if tokens_per_step < 1:
        raise VoxtralError(f"tokens_per_step {tokens_per_step}: must be at least 1")
    shapes = state_shapes(dims)
    state_bytes = {n: int(np.prod(s)) * 2 for n, s in shapes.items()}
    frames = mel_frames_per_step(tokens_per_step)
    return {
        "form": form,
        "tokens_per_step": tokens_per_step,
        "mel_frames_per_step": frames,
        "step_ms": frames * HOP_LENGTH * 1000 // SAMPLE_RATE,
        "states": [{"name": n, "shape": shapes[n], "dtype": "float16", "bytes": state_bytes[n]} for n in STATE_NAMES],
        "state_bytes": sum(state_bytes.values()),
        "cache_slots": dims.cache_slots,
        "sliding_window": dims.sliding_window,
        "max_tokens": MAX_TOKENS,
        "position": "tokens emitted so far in this stream (int32); start a new stream (fresh state, 0) "
        "before max_tokens",
    }


def feeding() -> dict[str, object]:
    """How an app feeds any Realtime package (manifest.json, every format): tokens per second and the features."""
    return {
        "tokens_per_second": 1000 // (MEL_FRAMES_PER_TOKEN * HOP_LENGTH * 1000 // SAMPLE_RATE),
        "features": {"kind": "voxtral_realtime", "global_log_mel_max": 1.5, "padding": "none (no 30 s windows)"},
    }


def convert_package(
    extracted_dir: str | os.PathLike[str],
    package: str | os.PathLike[str],
    recipe: Recipe,
    *,
    model_name: str,
    variant: str | None = None,
    attention: str,
    query_chunk: int,
    sensitivity: dict | None = None,
    streaming: dict | None = None,
    calibrated: dict | None = None,
) -> dict:
    """Write the offline package (or, with `streaming` = {form, tokens_per_step}, the step) and its manifest.

    `calibrated`: a data-aware recipe's compressed weights (calibration.py), applied to every module converted."""
    from voxtral_coreml.export.sensitivity import program_bits

    started = time.monotonic()
    package = Path(package)
    if package.suffix != ".mlpackage":
        raise VoxtralError(f"{package}: the output must end in .mlpackage")
    check_cached_inputs(recipe, sensitivity, calibrated)
    weights, dims, encoder_meta = load_extracted(extracted_dir, dtype=torch.float16, lazy=True)  # read when used
    info = None if streaming is None else streaming_info(dims, streaming["form"], int(streaming["tokens_per_step"]))
    target = recipe.min_target if info is None else _later(recipe.min_target, FORMS[info["form"]])
    what = "offline window" if info is None else f"{info['form']} step, {info['tokens_per_step']} token(s)"
    log.info("converting %s (Realtime, %d layers, %s) with recipe %s", model_name, dims.n_layers, what, recipe.name)

    def compressed(mlmodel):
        """The program compressed as the recipe says (a data-aware recipe's ops are in it already) and how."""
        if calibrated is not None:
            return mlmodel, torch_compression_info(offline_module(), recipe, calibrated)
        bits = program_bits(sensitivity, recipe, mlmodel, offline_module()) if recipe.needs_scan else None
        return compress_mlmodel(mlmodel, recipe, bits)

    def offline_module():
        return build_offline_encoder(weights, dims, attention, query_chunk)

    def program(streaming_form: dict | None):
        mlmodel, compression = compressed(
            to_mlprogram(weights, dims, target, streaming_form, attention, query_chunk, calibrated)
        )
        mlmodel.short_description = f"Voxtral Realtime audio encoder + projector, {what} ({recipe.name})"
        mlmodel.version = __version__
        return mlmodel, compression

    with coremltools_writes(package), atomic_path(package) as staging:
        if info is not None and info["form"] == "multifunction":
            compression = save_multifunction_package(program, info, staging)
        else:
            mlmodel, compression = program(info)
            mlmodel.save(str(staging))
        canonicalize_package(staging)
    manifest = {
        **package_manifest(package, model_name, variant or "Realtime", recipe, compression, target),
        "family": "realtime",
        **io_contract(dims, {"streaming": info}),
        **build_facts(dims, attention, query_chunk, encoder_meta),
        **feeding(),
    }
    if info is not None:
        manifest["streaming"] = info
    if info is not None and info["form"] == "multifunction":
        offline = io_contract(dims)
        manifest["functions"] = {OFFLINE_FUNCTION: offline, STEP_FUNCTION: io_contract(dims, {"streaming": info})}
    write_manifest(package, manifest, started)
    return manifest
