"""Extracted weights -> Core ML mlprogram package + manifest.json.

The program is made layer by layer (layered.py: the stem, head and one layer through torch.export + ct.convert, every
layer's weights written into copies of that layer's program), so conversion holds one layer at a time; a module that
carries a data-aware recipe's compressed weights is converted whole (mlprogram.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from voxtral_coreml import __version__
from voxtral_coreml.encoders.dims import EncoderDims
from voxtral_coreml.encoders.model import VoxtralEncoderANE, build_ane_encoder
from voxtral_coreml.pipeline.atomic import atomic_path, disk_full_is_an_error, shown_path, write_json_atomic
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.paths import MANIFEST
from voxtral_coreml.sources.extract import load_extracted

from .canonical import canonicalize_package
from .compress import clustering_ahead, compress_mlmodel
from .layered import BuildModule, layered_mlprogram
from .mlprogram import convert_stage
from .package_info import ane_report
from .recipes import TARGETS, Recipe
from .sensitivity import program_bits
from .torch_compress import TORCH_KINDS, apply_compressed, torch_compression_info

log = logging.getLogger(__name__)

INPUT_NAME = "mel_spectrogram"
OUTPUT_NAME = "audio_embeddings"
VARIANT_BY_HIDDEN_SIZE = {3072: "Mini", 5120: "Small"}


def package_name(variant: str) -> str:
    return f"VoxtralEncoder{variant}.mlpackage"  # the names the Swift app looks for


def infer_variant(dims: EncoderDims) -> str:
    variant = VARIANT_BY_HIDDEN_SIZE.get(dims.hidden_size)
    if variant is None:
        raise VoxtralError(
            f"cannot tell Mini from Small for projector width {dims.hidden_size}; pass --variant Mini|Small"
        )
    return variant


def check_cached_inputs(recipe: Recipe, sensitivity: dict | None, calibrated: dict | None) -> None:
    """What the sensitivity stage cached (calibration.cached_inputs) is what the recipe converts from."""
    if recipe.needs_scan and sensitivity is None:
        raise VoxtralError(f"recipe '{recipe.name}': a mixed recipe needs its sensitivity scan")
    if (recipe.kind in TORCH_KINDS) != (calibrated is not None):
        raise VoxtralError(f"recipe '{recipe.name}': compressed weights are for {', '.join(TORCH_KINDS)} recipes only")


def mel_example(dims) -> torch.Tensor:
    return torch.zeros(1, dims.n_mels, dims.mel_frames)


def convert_to_mlprogram(model: VoxtralEncoderANE, target: str):
    """The module converted whole: for one whose weights carry compression metadata (a data-aware recipe's)."""
    return convert_stage(model, mel_example(model.dims), INPUT_NAME, np.float32, OUTPUT_NAME, np.float32, target)


def encoder_mlprogram(weights, dims, build: BuildModule, target: str, compressed: torch.nn.Module | None = None):
    """Any family's offline window as an mlprogram: layer by layer (layered.py) from plain weights; `compressed`, a
    module holding a data-aware recipe's weights (ct.convert makes their ops from its metadata), is converted whole."""
    if compressed is not None:
        return convert_to_mlprogram(compressed, target)
    return layered_mlprogram(weights, dims, build, target, (INPUT_NAME, OUTPUT_NAME), mel_example(dims))


# How coremltools' C++ weight writer reports any failed write, a full disk among them (without the errno).
COREMLTOOLS_WRITE_FAILURE = "[MIL FileWriter]"


@contextlib.contextmanager
def coremltools_writes(package: Path) -> Iterator[None]:
    """coremltools writes a temporary package while it converts: a failed write there names `package`."""
    with disk_full_is_an_error(package):
        try:
            yield
        except RuntimeError as e:
            if not str(e).startswith(COREMLTOOLS_WRITE_FAILURE):
                raise
            where = tempfile.gettempdir()
            raise VoxtralError(
                f"{shown_path(package)}: coremltools could not write the weights into {where}: is the disk full? "
                f"({e}); "
                "nothing was written"
            ) from e


def io_contract(dims: EncoderDims) -> dict[str, list[dict[str, object]]]:
    return {
        "inputs": [{"name": INPUT_NAME, "shape": [1, dims.n_mels, dims.mel_frames], "dtype": "float32"}],
        "outputs": [{"name": OUTPUT_NAME, "shape": [1, dims.n_embeddings, dims.hidden_size], "dtype": "float32"}],
    }


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def versions() -> dict[str, str]:
    import coremltools

    return {"coremltools": coremltools.__version__, "torch": torch.__version__, "voxtral_coreml": __version__}


def package_manifest(
    package: Path, model_name: str, variant: str, recipe: Recipe, compression: dict, target: str
) -> dict:
    """What every package's manifest says about the package itself (a family adds its I/O and its own facts)."""
    ios, macos = TARGETS[target]
    return {
        "package": package.name,
        "model": model_name,
        "variant": variant,
        "recipe": {"name": recipe.name, "kind": recipe.kind, "params": dict(recipe.params)},
        "compression": {k: v for k, v in compression.items() if k not in ("recipe", "kind", "params")},
        "deployment_target": {"coreml": target, "ios": ios, "macos": macos},
        "size_bytes": tree_size(package),
        "ane": ane_report(package),
        "versions": versions(),
    }


def build_facts(dims, attention: str, query_chunk: int, encoder_meta: dict) -> dict:
    """How the package was built and from which weights."""
    return {
        "dims": dims.to_json(),
        "attention": attention,
        "query_chunk": query_chunk,
        "weights_sha256": encoder_meta["weights_sha256"],
        "source": encoder_meta.get("source", {}),
    }


def write_manifest(package: Path, manifest: dict, started: float) -> None:
    """The manifest beside the package, written last: a package with a manifest is complete."""
    write_json_atomic(package.parent / MANIFEST, manifest)
    log.info(
        "wrote %s (%.1f MB) in %.1f s", shown_path(package), manifest["size_bytes"] / 1e6, time.monotonic() - started
    )


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
    calibrated: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Write the `.mlpackage` at `package` and `manifest.json` beside it, each atomically (manifest last).

    `attention` and `query_chunk` are conf/conversion.yaml's `build` settings (the CLI reads the same file).

    `sensitivity` is the scan a `mixed` recipe chooses its bits from (sensitivity.scan_sensitivity); `calibrated`
    the compressed weights of a torch-compressed recipe (calibration.calibrate), applied before conversion."""
    started = time.monotonic()
    package = Path(package)
    if package.suffix != ".mlpackage":
        raise VoxtralError(f"{package}: the output must end in .mlpackage")
    check_cached_inputs(recipe, sensitivity, calibrated)
    # fp16 from the start: the package stores fp16 anyway (bf16 -> fp16 rounds as bf16 -> fp32 -> fp16 would),
    # it halves memory, and coremltools skips its slow fp32 overflow scan of every weight. Read when used: a
    # layered conversion holds one layer's.
    weights, dims, encoder_meta = load_extracted(extracted_dir, dtype=torch.float16, lazy=True)
    variant = variant or infer_variant(dims)
    build = functools.partial(build_ane_encoder, attention=attention, query_chunk=query_chunk)

    @functools.cache
    def module() -> VoxtralEncoderANE:
        """The whole module (every weight read), for the recipes that look at it."""
        model = build(weights, dims)
        if calibrated is not None:
            apply_compressed(model, calibrated)  # ct.convert emits the compressed ops from the metadata
        return model

    log.info("converting %s (%s, %d layers) with recipe %s", model_name, variant, dims.n_layers, recipe.name)
    with coremltools_writes(package), clustering_ahead(module, recipe) as ahead:
        compressed = module() if calibrated is not None else None
        mlmodel = encoder_mlprogram(weights, dims, build, recipe.min_target, compressed)
        if calibrated is not None:
            compression = torch_compression_info(module(), recipe, calibrated)
        else:
            bits = program_bits(sensitivity, recipe, mlmodel, module()) if recipe.needs_scan else None
            mlmodel, compression = compress_mlmodel(mlmodel, recipe, bits, ahead=ahead)
        module.cache_clear()
    mlmodel.short_description = f"Voxtral {variant} audio encoder + projector ({recipe.name})"
    mlmodel.version = __version__
    with atomic_path(package) as staging:
        mlmodel.save(str(staging))
        canonicalize_package(staging)  # the same model and recipe give the same bytes
    manifest = {
        **package_manifest(package, model_name, variant, recipe, compression, recipe.min_target),
        **io_contract(dims),
        **build_facts(dims, attention, query_chunk, encoder_meta),
    }
    write_manifest(package, manifest, started)
    return manifest
