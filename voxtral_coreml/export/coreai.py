"""Any PyTorch module -> a Core AI `.aimodel` asset (iOS/macOS 27): torch.export, coreai-torch, coreai-opt.

`export_asset` takes any `nn.Module`, its example inputs and I/O names, so every encoder family exports the same
way; `convert_asset` is the Voxtral encoder's use of it, with the manifest the Core ML packages have. The module is
the same ANE-layout module the Core ML packages come from (model.py): the Neural Engine principles are in its
layout, not in the format.

Recipes map onto coreai-opt's weight compression where one is equivalent (RECIPE MAPPING below); a recipe without
an equivalent is refused before any work (format_recipes.py).

Reproducible bytes: coreai-torch names each weight blob `resource_<hash>`, a hash that differs in every process, and
`save_asset` stamps a creation date into metadata.json. `canonical_resource_names` renames the blobs `w0, w1, ...` in
program order, the date is removed and metadata.json's keys are sorted, so the same module and recipe give the same
asset folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from voxtral_coreml import __version__
from voxtral_coreml.encoders.attention import Mask
from voxtral_coreml.encoders.model import build_ane_encoder
from voxtral_coreml.pipeline.atomic import atomic_path, shown_path
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted

from .convert import infer_variant, io_contract, tree_size, write_manifest
from .format_recipes import check_recipe_kind
from .formats import ATTENTION_PRECISION, FORMATS
from .recipes import Recipe

if TYPE_CHECKING:
    from coreai.authoring import AIProgram

log = logging.getLogger(__name__)

ASSET_SUFFIX = FORMATS["coreai"].suffix
MINIMUM_OS = "27.0"  # the first iOS and macOS with Core AI: every asset needs it whatever its compression
DEFAULT_TARGET = "v27"  # coreai's OSVersion name
COREAI_PACKAGES = ("coreai-core", "coreai-torch", "coreai-opt")

# RECIPE MAPPING: recipe kind -> what coreai-opt does (format_recipes.RECIPE_KINDS: the kinds mapped). `mixed` (a bit
# width per weight from the sensitivity scan) has no equivalent: coreai-opt palettizes every weight at one width.
QSCHEME = {"linear_symmetric": "SYMMETRIC", "linear": "ASYMMETRIC"}
GRANULARITY = {
    "per_tensor": "PER_TENSOR",
    "per_channel": "PER_CHANNEL",
    "per_block": "PER_BLOCK",
    "per_grouped_channel": "PER_GROUPED_CHANNEL",
}


ATTENTION_PRECISIONS = ATTENTION_PRECISION.choices


class Fp32Attention(nn.Module):
    """An attention core computing in fp32 on fp16 activations: coreai-core's Linux runtime accumulates fp16 matrix
    products in fp16, which over 1500 keys costs demo-small's fp16 asset 24 dB (46.5 dB vs transformers; 70.2 dB
    with this). The projections, norms and MLPs stay fp16."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        return self.core(q.float(), k.float(), v.float(), None if mask is None else mask.float()).to(q.dtype)


def check_attention_precision(precision: str) -> None:
    if precision not in ATTENTION_PRECISIONS:
        choices = ", ".join(ATTENTION_PRECISIONS)
        raise VoxtralError(f"coreai.attention_precision: {precision!r} is not one of {choices}")


def with_attention_precision(model: nn.Module, precision: str) -> nn.Module:
    """The encoder (any family's: every attention module holds its core as `core`) with its attention cores
    computing in `precision` (fp16: as the Core ML packages do)."""
    if precision == "fp32":
        for module in list(model.modules()):
            if isinstance(getattr(module, "core", None), nn.Module) and not isinstance(module, Fp32Attention):
                module.core = Fp32Attention(module.core)
    return model


def compression_settings(recipe: Recipe) -> dict[str, Any]:
    """The coreai-opt call a recipe stands for, as plain data (what manifest.json records)."""
    check_recipe_kind("coreai", recipe.name, recipe.kind)
    p = recipe.params
    if recipe.kind == "fp16":
        return {"pass": None, "weights": "float16"}
    settings: dict[str, Any] = {"weight_num_threshold": p["weight_threshold"], "granularity": p["granularity"]}
    if recipe.kind == "linear":
        settings |= {"pass": "quantize_weights", "dtype": p["dtype"], "qscheme": QSCHEME[p["mode"]]}
        if p["granularity"] == "per_block":
            settings["block_size"] = p["block_size"]
        return settings
    settings |= {"pass": "palettize_weights", "n_bits": p["nbits"], "lut_dtype": None}
    if p["granularity"] == "per_grouped_channel":
        settings["group_size"] = p["group_size"]
    # One k-means worker: with the default 4, grouped palettization deadlocks (coreai-opt 0.4.0), and one worker
    # makes the LUTs independent of scheduling.
    settings["num_kmeans_workers"] = 1
    return settings


def compress(program: AIProgram, settings: dict[str, Any]) -> AIProgram:
    """Apply `compression_settings`' call to a converted program."""
    from coreai_opt.coreai_utils import CompressionGranularity, DType, QScheme, palettize_weights, quantize_weights

    kwargs = {k: v for k, v in settings.items() if k not in ("pass", "weights")}
    if settings["pass"] is None:
        return program
    kwargs["granularity"] = CompressionGranularity[GRANULARITY[kwargs["granularity"]]]
    if settings["pass"] == "quantize_weights":
        kwargs["dtype"] = DType[kwargs["dtype"].upper()]
        kwargs["qscheme"] = QScheme[kwargs["qscheme"]]
        return quantize_weights(program, **kwargs)
    return palettize_weights(program, **kwargs)


def canonical_resource_names(program: AIProgram) -> int:
    """Rename every weight blob to `w<index>` in program order (in place); returns how many there were."""
    from coreai._compiler._mlir_libs._coreaiIR import _bindings
    from coreai._compiler.ir import DenseResourceElementsAttr, WalkResult

    count = 0

    def rename(op: Any) -> Any:
        nonlocal count
        op = op.opview
        if op.name == "coreai.constant" and DenseResourceElementsAttr.isinstance(op.attributes["value"]):
            tensor_type = op.result.type
            nbytes = -(-int(np.prod(tensor_type.shape)) * tensor_type.element_type.width // 8)
            data = np.zeros(nbytes, dtype=np.uint8)  # the blob's bytes as stored (sub-byte types packed)
            _bindings.compiler.copy_constant_value_to_array(constant_op=op, destination=data)
            op.attributes["value"] = DenseResourceElementsAttr.get_from_buffer(data, f"w{count}", tensor_type)
            count += 1
        return WalkResult.ADVANCE

    module = program._module._mlir_module  # coreai has no public walk over an AIProgram
    with module.context:
        module.operation.walk(rename)
    return count


@contextlib.contextmanager
def quiet_coreai() -> Iterator[None]:
    """coreai-torch warns that torch 2.13.0 is at the edge of what it validated (the pin here is tested); torchao,
    which coreai-opt imports, is quieted on import (voxtral_coreml/__init__.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coreai-torch has only been validated")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def remainder_by_tensor(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """aten.remainder.Scalar, which coreai-torch 0.4.3 does not lower, as the remainder.Tensor it does."""
    return torch.remainder(x, torch.full((), divisor, dtype=x.dtype))


def to_program(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    state_names: Sequence[str] = (),
) -> AIProgram:
    """torch.export (fake tensors, no forward pass on real weights) -> coreai-torch's optimized program.

    A buffer the module mutates in place becomes a state named by `state_names` (for a streaming step)."""
    with quiet_coreai():
        from coreai_torch import TorchConverter, get_decomp_table

        table = get_decomp_table()  # a CustomDecompTable: entries are added in place
        table[torch.ops.aten.remainder.Scalar] = remainder_by_tensor
        with torch.no_grad():
            exported = torch.export.export(module, example_inputs).run_decompositions(table)
        converter = TorchConverter(mode=TorchConverter.Mode.RELEASE)  # no stack traces (paths) in the asset
        converter.add_exported_program(
            exported, input_names=list(input_names), output_names=list(output_names), state_names=list(state_names)
        )
        return converter.to_coreai()


def save_canonical_asset(program: AIProgram, path: Path, description: str) -> None:
    """`program` as an asset folder at `path` whose bytes depend on the program only."""
    canonical_resource_names(program)
    asset = program.save_asset(path)

    def describe(metadata: Any) -> None:
        metadata.creation_date = None
        metadata.model_description = description

    asset.update_metadata(describe)
    metadata = path / "metadata.json"  # coreai-core writes its keys in a different order in each process
    metadata.write_text(json.dumps(json.loads(metadata.read_text()), indent=2, sort_keys=True) + "\n")


def export_asset(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    asset: str | os.PathLike[str],
    *,
    compression: dict[str, Any] | None = None,
    state_names: Sequence[str] = (),
    description: str = "",
) -> None:
    """Export any module to a Core AI asset at `asset` (an `.aimodel` folder), atomically and byte-reproducibly.

    `compression` is `compression_settings(recipe)` (None: the module's own dtype)."""
    asset = Path(asset)
    if asset.suffix != ASSET_SUFFIX:
        raise VoxtralError(f"{asset}: a Core AI asset must end in {ASSET_SUFFIX}")
    program = to_program(module, example_inputs, input_names, output_names, state_names)
    if compression is not None:
        program = compress(program, compression)
    with atomic_path(asset) as staging:
        save_canonical_asset(program, staging, description)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    packages = {name: version(name) for name in COREAI_PACKAGES}
    return packages | {"torch": torch.__version__, "voxtral_coreml": __version__}


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}


def export_encoder(
    module: nn.Module,
    contract: dict[str, list[dict]],
    asset: Path,
    compression: dict[str, Any],
    *,
    attention_precision: str,
    description: str,
    state_names: Sequence[str] = (),
) -> None:
    """An encoder family's ANE module (fp16 weights) as the asset: I/O names and shapes from `contract` (the same
    as its Core ML package's), attention cores in `attention_precision`, a failure one error with nothing written."""
    example = tuple(torch.zeros(io["shape"], dtype=TORCH_DTYPES[io["dtype"]]) for io in contract["inputs"])
    inputs, outputs = ([io["name"] for io in contract[key]] for key in ("inputs", "outputs"))
    model = with_attention_precision(module, attention_precision)
    try:
        export_asset(model, example, inputs, outputs, asset, compression=compression, state_names=state_names,
                     description=description)  # fmt: skip
    except RuntimeError as e:  # coreai's writer and compiler report failures as RuntimeError
        raise VoxtralError(f"{shown_path(asset)}: Core AI export failed ({e}); nothing was written") from e


def asset_manifest(asset: Path, recipe: Recipe, compression: dict[str, Any], contract: dict, **fields: Any) -> dict:
    """manifest.json of an asset: what every Core AI asset records, then the family's own `fields`."""
    return {
        "package": asset.name,
        "format": "coreai",
        "recipe": {"name": recipe.name, "kind": recipe.kind, "params": dict(recipe.params)},
        "compression": compression,
        **contract,
        "deployment_target": {"coreai": DEFAULT_TARGET, "ios": MINIMUM_OS, "macos": MINIMUM_OS},
        **fields,
        "size_bytes": tree_size(asset),
        "versions": versions(),
    }


def convert_asset(
    extracted_dir: str | os.PathLike[str],
    asset: str | os.PathLike[str],
    recipe: Recipe,
    *,
    model_name: str,
    variant: str | None = None,
    attention: str,
    query_chunk: int,
    attention_precision: str,
) -> dict:
    """The Voxtral 2507 encoder as a Core AI asset at `asset`, `manifest.json` beside it (the Core ML packages' I/O
    contract: `mel_spectrogram` [1,128,3000] fp32 -> `audio_embeddings` [1,375,H] fp32); the attention cores compute
    in `attention_precision`, everything else in fp16."""
    started = time.monotonic()
    asset = Path(asset)
    compression = compression_settings(recipe)
    check_attention_precision(attention_precision)
    weights, dims, encoder_meta = load_extracted(extracted_dir, dtype=torch.float16)  # fp16 weights and compute
    variant = variant or infer_variant(dims)
    log.info("exporting %s (%s, %d layers) to Core AI with recipe %s", model_name, variant, dims.n_layers, recipe.name)
    contract = io_contract(dims)
    description = f"Voxtral {variant} audio encoder + projector ({recipe.name})"
    export_encoder(build_ane_encoder(weights, dims, attention, query_chunk), contract, asset, compression,
                   attention_precision=attention_precision, description=description)  # fmt: skip
    manifest = asset_manifest(
        asset, recipe, compression, contract, model=model_name, variant=variant, dims=dims.to_json(),
        attention=attention, attention_precision=attention_precision, weights_sha256=encoder_meta["weights_sha256"],
        source=encoder_meta.get("source", {}),
    )  # fmt: skip
    write_manifest(asset, manifest, started)
    return manifest
