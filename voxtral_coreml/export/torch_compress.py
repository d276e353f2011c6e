"""Compression of a PyTorch module before conversion, with coremltools.optimize.torch's own post-training tools.

ANE principle: weights stay compressed in the package (LUTs or int4/int8 blocks with scales) and the Neural Engine
decompresses them on the fly; the compressed module carries coremltools' compression metadata
(`<module>._COREML_/weight/...` buffers), from which `ct.convert` emits exactly those constexpr ops.

    gptq   LayerwiseCompressor + ModuleGPTQConfig: quantizes layer after layer and compensates each weight's
           rounding error on the calibration activations (needs the model as a sequence of stages)
    skm    SKMPalettizer: k-means weighted by each weight's Fisher information on the calibration data; with
           `promote`, the weights whose compression alone hurts the output most get more bits (promote_sensitive)
    ptp    PostTrainingPalettizer: k-means without data (per-channel scales, int8 LUTs: coremltools' own fields)

Family-agnostic: it sees an nn.Module, the stages it runs in (gptq) and calibration inputs, nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.safetensors_io import TensorSpec, read_header, read_tensor, write_safetensors

if TYPE_CHECKING:
    from .recipes import Recipe

log = logging.getLogger(__name__)

METADATA = "._COREML_/"  # coremltools' compression metadata buffers: "<module>._COREML_/weight/<key>"
CALIBRATED_KINDS = ("gptq", "skm")  # the kinds that run calibration data through the model
READOUTS = 4  # random readouts per calibration input for SKM's Fisher information
SEED = 0  # coremltools' k-means initialization draws from torch's generator
INFO_KEY = "calibration"  # the safetensors metadata entry holding how the result was made
WEIGHT_METADATA = "_COREML_/weight/"  # a compressed module's own buffers (the model's root holds a version too)
DAMAGE_WINDOWS = 1  # calibration windows promote_sensitive ranks weights on
LUT_KEY = "weight/lut"  # a palettized weight's LUT: [..., 2^bits, cluster_dim]
STORED_INFO = ("recipe", "kind", "calibration", "device")  # not times: the same inputs give the same file


class Stage(nn.Module):
    """A step of a model's forward (a bound method) as a module owning the submodules it uses: GPTQ runs a model
    stage by stage and needs each stage as a module."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *owned: nn.Module) -> None:
        super().__init__()
        self.step = forward
        self.owned = nn.ModuleList(owned)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)


def small_modules(model: nn.Module, weight_threshold: int) -> dict[str, None]:
    """Modules whose weight has at most `weight_threshold` elements: left uncompressed (a None config)."""
    return {
        name: None
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.numel() <= weight_threshold
    }


def _tool_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("weight_threshold", "calibration", "promote")}


def readout_loss(seed: int = SEED) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """SKM's loss without labels: fixed random readouts of the output, whose squared gradients average to the
    diagonal of J^T J (how much each weight moves the output)."""
    readouts: dict[tuple[int, ...], torch.Tensor] = {}

    def loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        shape = (READOUTS, *out.shape)
        if shape not in readouts:
            readouts[shape] = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
        return (out.unsqueeze(0) * readouts[shape]).sum() / READOUTS**0.5

    return loss


def _gptq(stages: nn.Sequential, params: dict[str, Any], data: Sequence[torch.Tensor], device: str, jobs: int) -> None:
    from coremltools.optimize.torch.layerwise_compression import (
        LayerwiseCompressor,
        LayerwiseCompressorConfig,
        ModuleGPTQConfig,
    )

    config = LayerwiseCompressorConfig(
        layers=list(stages),
        global_config=ModuleGPTQConfig(**_tool_params(params)),
        module_name_configs=small_modules(stages, params["weight_threshold"]),
        calibration_nsamples=len(data),
    )
    LayerwiseCompressor(stages, config).compress(list(data), device=device, inplace=True)


def _palettizer_config(stages: nn.Sequential, params: dict[str, Any], config_cls, module_config_cls):
    return config_cls(
        global_config=module_config_cls(**_tool_params(params)),
        module_name_configs=small_modules(stages, params["weight_threshold"]),
    )


def _skm(stages: nn.Sequential, params: dict[str, Any], data: Sequence[torch.Tensor], device: str, jobs: int) -> None:
    from coremltools.optimize.torch import palettization as pal

    config = _palettizer_config(stages, params, pal.SKMPalettizerConfig, pal.ModuleSKMPalettizerConfig)
    with torch.enable_grad():
        stages.requires_grad_(True)  # SKM's Fisher information: squared gradients of the weights
        pal.SKMPalettizer(stages, config).compress(
            dataloader=list(data), loss_fn=readout_loss(), num_kmeans_workers=jobs, inplace=True
        )


def _ptp(stages: nn.Sequential, params: dict[str, Any], data: Sequence[torch.Tensor], device: str, jobs: int) -> None:
    from coremltools.optimize.torch import palettization as pal

    config = _palettizer_config(
        stages, params, pal.PostTrainingPalettizerConfig, pal.ModulePostTrainingPalettizerConfig
    )
    pal.PostTrainingPalettizer(stages, config).compress(num_kmeans_workers=jobs, inplace=True)


def compressed_modules(root: nn.Module) -> dict[str, nn.Module]:
    """The modules under `root` that coremltools compressed (they carry its metadata buffers), by name."""
    return {name: m for name, m in root.named_modules() if any(b.startswith(WEIGHT_METADATA) for b in m._buffers)}


@torch.no_grad()
def compression_damage(
    stages: nn.Sequential, original: dict[str, torch.Tensor], data: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Output noise energy (summed over `data`) that each compressed weight causes alone, every other weight as
    `original` holds it. Each stage's input is computed once; a weight's trial re-runs the stages from its own on."""
    modules = compressed_modules(stages)
    compressed = {name: modules[name].weight.data for name in original}
    for name, weight in original.items():
        modules[name].weight.data = weight
    inputs, outputs = [], []
    for x in data:
        inputs.append([])
        for stage in stages:
            inputs[-1].append(x)
            x = stage(x)
        outputs.append(x)
    damage = {}
    for name in original:
        first = int(name.split(".")[0])  # the stage that owns the weight: stages are named 0, 1, ...
        modules[name].weight.data = compressed[name]
        noise = 0.0
        for stage_inputs, reference in zip(inputs, outputs, strict=True):
            y = stage_inputs[first]
            for stage in stages[first:]:
                y = stage(y)
            noise += float(((y - reference) ** 2).sum())
        damage[name] = noise
        modules[name].weight.data = original[name]
    for name, weight in compressed.items():
        modules[name].weight.data = weight
    return damage


def choose_promoted(damage: dict[str, float], sizes: dict[str, int], share: float) -> list[str]:
    """The weights to promote: most noise removed per parameter first, while they fit in `share` of all parameters
    (promoting a weight removes most of its noise; the bits it costs grow with its size)."""
    budget, used, chosen = share * sum(sizes.values()), 0, []
    for name in sorted(damage, key=lambda n: (-damage[n] / sizes[n], n)):
        if used + sizes[name] <= budget:
            chosen.append(name)
            used += sizes[name]
    return sorted(chosen)


def promote_sensitive(
    stages: nn.Sequential, params: dict[str, Any], data: Sequence[torch.Tensor], original: dict, jobs: int
) -> list[str]:
    """Outlier weights kept apart: each compressed weight's damage is measured on the first calibration window (one
    trial per weight, re-running the model from the weight's stage on: at full size about half a minute each), and
    the worst are compressed again from their original values at `promote.n_bits` (k-means without data, the
    recipe's granularity and scales). Returns the promoted weights' names under `stages`."""
    from coremltools.optimize.torch import palettization as pal

    promote = params["promote"]
    damage = compression_damage(stages, original, data[:DAMAGE_WINDOWS])
    chosen = choose_promoted(damage, {n: w.numel() for n, w in original.items()}, promote["share"])
    modules = compressed_modules(stages)
    for name in chosen:
        modules[name].weight.data = original[name].clone()
        for buffer in [b for b in modules[name]._buffers if b.startswith(WEIGHT_METADATA)]:
            del modules[name]._buffers[buffer]
    module_config = pal.ModulePostTrainingPalettizerConfig(**{**_tool_params(params), "n_bits": promote["n_bits"]})
    config = pal.PostTrainingPalettizerConfig(module_name_configs={re.escape(n): module_config for n in chosen})
    if chosen:
        pal.PostTrainingPalettizer(stages, config).compress(num_kmeans_workers=jobs, inplace=True)
    total = math.fsum(damage.values())
    log.info("promoted to %d bits: %s (%.1f%% of the measured noise)", promote["n_bits"], ", ".join(chosen) or "none",
             100 * math.fsum(damage[n] for n in chosen) / total if total else 0.0)  # fmt: skip
    return chosen


# kind -> how coremltools.optimize.torch compresses it: (stages, params, calibration data, device, k-means workers)
COMPRESSORS = {"gptq": _gptq, "skm": _skm, "ptp": _ptp}
TORCH_KINDS = tuple(COMPRESSORS)


def compress_module(
    model: nn.Module,
    stages: nn.Sequential,
    kind: str,
    params: dict[str, Any],
    data: Sequence[torch.Tensor],
    device: str = "cpu",
    jobs: int = 1,
) -> dict[str, torch.Tensor]:
    """Compress `model` (fp32, in place) as `kind` says; returns the compressed weights and their metadata by
    `model`'s own names: what `apply_compressed` needs to give another instance of the model the same compression.

    `stages` runs `model`'s forward as a sequence of modules sharing its submodules; `data` are its inputs."""
    if kind not in COMPRESSORS:
        raise ValueError(f"not a torch compression kind: {kind!r}")
    torch.manual_seed(SEED)
    model.to(device)
    data = [x.to(device) for x in data]
    promote = params.get("promote")
    before = {n: p.detach().clone() for n, p in stages.named_parameters() if n.endswith(".weight")} if promote else {}
    COMPRESSORS[kind](stages, params, data, device, jobs)
    if promote:
        original = {name: before[f"{name}.weight"] for name in compressed_modules(stages)}
        promote_sensitive(stages, params, data, original, jobs)
    model.requires_grad_(False).cpu()
    state = model.state_dict()
    compressed = {key.split(METADATA)[0] for key in state if METADATA in key}
    log.info("%s: %d weights compressed", kind, len(compressed))
    kept = [k for k in state if k.split(METADATA)[0] in compressed or k.removesuffix(".weight") in compressed]
    return {k: state[k].detach().cpu().contiguous() for k in kept}


def apply_compressed(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give `model` the compressed weights (in its own dtype) and register their metadata buffers, so that
    `ct.convert` of the exported model emits the compressed ops."""
    for key, value in state.items():
        if METADATA in key:
            module_name, buffer = key.split(METADATA)
            module = model.get_submodule(module_name)
            # Scales and LUTs in the weights' dtype (a package stores them in fp16); integer metadata as is.
            value = value.to(module.weight.dtype) if value.is_floating_point() else value
            module.register_buffer("_COREML_/" + buffer, value.clone())
        else:
            module_name, _ = key.rsplit(".", 1)
            weight = model.get_submodule(module_name).weight
            if weight.shape != value.shape:
                raise ValueError(f"compressed weight '{key}' is {list(value.shape)}, the model's {list(weight.shape)}")
            weight.data = value.to(weight.dtype)


def torch_compression_info(model: nn.Module, recipe: Recipe, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the manifest records: bits per module weight (16: left uncompressed, as coremltools leaves a weight whose
    channels a block or group does not divide) and their parameter-weighted average."""
    from .compress import average_bits, compressible_weights

    params = recipe.params
    nbits = params.get("n_bits") or int(params["weight_dtype"].removeprefix("uint"))
    weights = compressible_weights(model, params["weight_threshold"])
    done = {key.split(METADATA)[0] for key in state if METADATA in key}
    luts = {key.split(METADATA)[0]: lut for key, lut in state.items() if key.endswith(METADATA + LUT_KEY)}
    bits = {name: 16 for name in weights} | {name: nbits for name in done}
    bits |= {name: int(math.log2(lut.shape[-2])) for name, lut in luts.items()}  # 2^bits entries: promoted ones too
    sizes = {name: w.numel() for name, w in weights.items()}
    left = sorted(n for n, b in bits.items() if b == 16)
    if left:
        log.warning("recipe %s: %d weights left in fp16 (%s)", recipe.name, len(left), ", ".join(left))
    return {"bits_per_op": bits, "average_bits": round(average_bits(bits, sizes), 4), "kept_fp16": left}


def save_calibration(path: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """The compressed state (none for a recipe without one) and what made it (`info` less its times)."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sorted(state.items())]
    stored = json.dumps({k: info[k] for k in STORED_INFO if k in info}, sort_keys=True)
    write_safetensors(path, specs, lambda spec: state[spec.name], {INFO_KEY: stored})


def calibration_info(path: Path) -> dict[str, Any]:
    """What made a cached calibration (save_calibration's metadata: recipe, kind, calibration, device)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()[INFO_KEY])


def load_calibration(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VoxtralError(f"{path}: not found (run the sensitivity stage first)")
    return {name: read_tensor(path, info) for name, info in read_header(path).items()}
