"""Data-aware recipes (gptq, skm, ptp) for Realtime: the offline module as stages, calibrated on the windows its
offline package gets (speech, then zeros to the window). The step shares the module's weights (model.py), so the
same compressed weights serve every streaming form."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from voxtral_coreml.export import calibration
from voxtral_coreml.export.calibration import CALIBRATION_ATTENTION
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.export.torch_compress import Stage
from voxtral_coreml.features.logmel import HOP_LENGTH

from .dims import CONV1_CONTEXT, CONV2_CONTEXT, RealtimeDims
from .features import realtime_log_mel
from .model import RealtimeEncoderANE, build_offline_encoder


def offline_stages(model: RealtimeEncoderANE) -> nn.Sequential:
    """The offline forward as stem, layers, head, each a module owning its weights: how GPTQ walks it."""
    _, *layers, head = model.stages()

    def stem(mel: torch.Tensor) -> torch.Tensor:
        """offline_stem's math through the conv modules themselves (GPTQ sees a weight through its module's
        hooks): the step's stem from a stream's zero contexts."""
        x = mel.unsqueeze(2)
        conv1_context = x.new_zeros(1, x.shape[1], 1, CONV1_CONTEXT)
        conv2_context = x.new_zeros(1, model.dims.d_model, 1, CONV2_CONTEXT)
        return model.stem(x, conv1_context, conv2_context)[0]

    return nn.Sequential(
        Stage(stem, model.conv1, model.conv2),
        *(Stage(run, layer) for run, layer in zip(layers, model.layers, strict=True)),
        Stage(head, model.norm, model.multi_modal_projector),
    )


def offline_window(clip: np.ndarray, dims: RealtimeDims) -> torch.Tensor:
    """[1, 128, frames]: the clip zero-padded (or cut) to the offline window, as encode_offline feeds a package."""
    window = np.zeros(dims.mel_frames * HOP_LENGTH, dtype=np.float32)
    kept = clip[: len(window)]
    window[: len(kept)] = kept
    return realtime_log_mel(window)[None]


def offline_module_and_stages(weights: dict[str, torch.Tensor], dims: RealtimeDims) -> tuple[nn.Module, nn.Sequential]:
    model = build_offline_encoder(weights, dims, CALIBRATION_ATTENTION)
    return model, offline_stages(model)


def calibrate(extracted_dir: str | os.PathLike[str], recipe: Recipe, jobs: int = 1) -> tuple[dict, dict[str, Any]]:
    """(compressed state, how it was made) for a torch-compressed recipe, on the fp32 offline module."""
    return calibration.calibrate(
        extracted_dir, recipe, jobs, module_and_stages=offline_module_and_stages, window=offline_window
    )
