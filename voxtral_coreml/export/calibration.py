"""Calibration for data-aware recipes (torch_compress.py): the data, the encoder as stages, the cached result.

A recipe's `calibration` key: `clips` clips of `seconds` of espeak-ng speech (clip i in voice, rate and text number
`first + i`: other clips than the tests measure on), each zero-padded into one window as the family's package gets
it at inference (2507: 30 s; Realtime: its offline window), so the statistics cover speech and the silence after
it; `device` runs the passes (cpu, cuda, mps: an accelerator changes the rounding, so it is part of the recipe).
The result (compressed weights and their metadata) is cached per model and recipe in a safetensors file, as the
sensitivity scan is.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from voxtral_coreml.encoders.model import VoxtralEncoderANE, build_ane_encoder
from voxtral_coreml.features.logmel import log_mel_windows
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted

from .recipes import Recipe
from .torch_compress import CALIBRATED_KINDS, TORCH_KINDS, Stage, compress_module

CALIBRATION_ATTENTION = "fused_heads"  # the same math as every core, the fewest torch ops


def encoder_stages(model: VoxtralEncoderANE) -> nn.Sequential:
    """The encoder's forward as stem, layers, head: how GPTQ walks it."""
    stem = Stage(model.stem, model.conv1, model.conv2)
    head = Stage(model.head, model.layer_norm, model.multi_modal_projector)
    return nn.Sequential(stem, *model.layers, head)


def calibration_clips(settings: dict[str, Any]) -> list[np.ndarray]:
    """The recipe's `calibration` clips of espeak-ng speech (16 kHz samples)."""
    from voxtral_coreml.features.espeak import clips

    return clips(settings["clips"], settings["seconds"], settings["first"])


def encoder_window(clip: np.ndarray, dims) -> torch.Tensor:
    """[1, n_mels, 3000]: the clip as the 2507 package gets it, speech then zero padding to 30 s."""
    return log_mel_windows(clip, n_mels=dims.n_mels)[:1]


def encoder_and_stages(weights: dict[str, torch.Tensor], dims) -> tuple[nn.Module, nn.Sequential]:
    model = build_ane_encoder(weights, dims, CALIBRATION_ATTENTION)
    return model, encoder_stages(model)


def resolve_device(device: str) -> str:
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device, False):
        raise VoxtralError(f"calibration.device {device!r} is not available on this machine")
    return device


# A family's part of calibration: its fp32 module and that module's forward as stages, from the extracted weights
# and dims; and one clip of speech as the window its offline package gets.
ModuleAndStages = Callable[[dict[str, torch.Tensor], Any], tuple[nn.Module, nn.Sequential]]
ClipWindow = Callable[[np.ndarray, Any], torch.Tensor]


def calibrate(
    extracted_dir: str | os.PathLike[str],
    recipe: Recipe,
    jobs: int = 1,
    *,
    module_and_stages: ModuleAndStages = encoder_and_stages,
    window: ClipWindow = encoder_window,
) -> tuple[dict, dict[str, Any]]:
    """(compressed state, how it was made) for a torch-compressed recipe, on a family's fp32 module (by default the
    2507 encoder; a family passes its own `module_and_stages` and `window`)."""
    if recipe.kind not in TORCH_KINDS:
        raise ValueError(f"recipe '{recipe.name}' ({recipe.kind}) needs no calibration")
    weights, dims, _ = load_extracted(extracted_dir)
    model, stages = module_and_stages(weights, dims)
    settings = recipe.params.get("calibration")
    clips = calibration_clips(settings) if recipe.kind in CALIBRATED_KINDS else []
    return compress_calibrated(model, stages, recipe, [window(clip, dims) for clip in clips], jobs)


def compress_calibrated(
    model: nn.Module, stages: nn.Sequential, recipe: Recipe, windows: list[torch.Tensor], jobs: int
) -> tuple[dict, dict[str, Any]]:
    """Any family's encoder (fp32), run as `stages`, compressed as `recipe` says on its calibration `windows`:
    (compressed state, how it was made)."""
    settings = recipe.params.get("calibration")
    device = resolve_device(settings["device"]) if settings else "cpu"
    started = time.monotonic()
    state = compress_module(model, stages, recipe.kind, recipe.params, windows, device, jobs)
    info = {
        "recipe": recipe.name,
        "kind": recipe.kind,
        "calibration": settings,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    return state, info


def cached_inputs(model: str, recipe: Recipe) -> dict[str, Any]:
    """What the sensitivity stage cached for `model` and `recipe`, as every family's convert_package takes it: the
    scan of a mixed recipe (`sensitivity`), the compressed weights of a data-aware one (`calibrated`)."""
    from voxtral_coreml.pipeline.paths import calibration_file, sensitivity_file
    from voxtral_coreml.sources.layouts import read_json

    from .torch_compress import load_calibration

    return {
        "sensitivity": read_json(sensitivity_file(model, recipe.name)) if recipe.needs_scan else None,
        "calibrated": load_calibration(calibration_file(model, recipe.name)) if recipe.kind in TORCH_KINDS else None,
    }
