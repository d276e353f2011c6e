"""Stream the audio tower + projector out of a checkpoint into one canonical safetensors file.

Tensor by tensor: each is read, checked and written before the next is touched, and the language model's
tensors are never read at all, so memory stays at one tensor whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from voxtral_coreml.encoders.dims import ENCODER_JSON, POSITIONS_KEY, WEIGHTS_FILE, EncoderDims
from voxtral_coreml.encoders.families import detect_family, family_module, family_of
from voxtral_coreml.encoders.model import whisper_sinusoids
from voxtral_coreml.pipeline.atomic import atomic_path, write_json_atomic
from voxtral_coreml.pipeline.errors import VoxtralError

from .layouts import Layout, SourceTensor, open_layout, read_json
from .safetensors_io import FLOAT_DTYPES, TensorSpec, read_header, read_tensor, write_safetensors

log = logging.getLogger(__name__)

SINUSOID_TOLERANCE = 1e-2  # bf16 storage rounds values in [-1, 1] by at most 2^-9


def _label(layout: Layout, name: str) -> str:
    stored = layout.source_name(name)
    return f"'{stored}'" if stored == name else f"'{stored}' ({name})"


def _check_against_dims(found: dict[str, SourceTensor], dims, layout: Layout) -> list[str]:
    """Names in canonical order; every mismatch is named before any data is read."""
    expected = dims.tensor_shapes()
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise VoxtralError(f"{layout.root}: tensor {_label(layout, missing[0])} is missing{more}")
    extra = sorted(set(found) - set(expected) - {POSITIONS_KEY})
    if extra:
        raise VoxtralError(
            f"{layout.root}: unexpected audio tensor {_label(layout, extra[0])} for a {dims.n_layers}-layer encoder"
        )
    for name, shape in expected.items():
        src = found[name]
        if src.shape != shape:
            implied = list(shape)
            raise VoxtralError(
                f"{src.file}: tensor {_label(layout, name)} has shape {list(src.shape)}, the config implies {implied}"
            )
        if src.dtype not in FLOAT_DTYPES:
            raise VoxtralError(f"{src.file}: tensor {_label(layout, name)} has dtype {src.dtype}, expected a float")
    return list(expected)


def _positions_are_sinusoids(src: SourceTensor, dims: EncoderDims) -> bool:
    if src.shape != (dims.n_positions, dims.d_model):
        raise VoxtralError(
            f"{src.file}: tensor '{POSITIONS_KEY}' has shape {list(src.shape)}, "
            f"expected {[dims.n_positions, dims.d_model]}"
        )
    stored = src.load().float()
    error = (stored - whisper_sinusoids(dims.n_positions, dims.d_model)).abs().max().item()
    return error <= SINUSOID_TOLERANCE


def update_weights_hash(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    # Name, dtype and shape are hashed with the bytes, so a reshaped or recast tensor hashes differently.
    digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def extract_audio_tower(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    layout: str = "auto",
    source: dict | None = None,
    family: str = "auto",
) -> dict:
    """Write `out_dir/encoder.safetensors` and `out_dir/encoder.json`; returns the encoder.json content.

    `source` (repo, revision, commit...) is recorded as given, for the manifests downstream; `family` is
    detected from the checkpoint unless given (a family the checkpoint is not is an error)."""
    root, out_dir = Path(checkpoint), Path(out_dir)
    family = detect_family(root, family)
    source_layout = open_layout(root, layout, family_module(family).LAYOUTS)
    dims = source_layout.dims()
    found = source_layout.tensors()
    names = _check_against_dims(found, dims, source_layout)
    positions = found.get(POSITIONS_KEY)
    if positions is not None and not _positions_are_sinusoids(positions, dims):  # 2507 only: Realtime has RoPE
        log.warning("%s: stored positions are not Whisper sinusoids; keeping them", positions.file)
        names.append(POSITIONS_KEY)
    specs = [TensorSpec(n, found[n].dtype, found[n].shape) for n in names]
    digest = hashlib.sha256()

    def produce(spec: TensorSpec) -> torch.Tensor:
        src = found[spec.name]
        tensor = src.load()
        if not torch.isfinite(tensor).all():
            raise VoxtralError(f"{src.file}: tensor {_label(source_layout, spec.name)} contains NaN or Inf")
        update_weights_hash(digest, spec.name, tensor)
        return tensor

    with atomic_path(out_dir) as staging:
        staging.mkdir()
        write_safetensors(staging / WEIGHTS_FILE, specs, produce)
        summary = {
            "family": family,
            "dims": dims.to_json(),
            "weights_sha256": digest.hexdigest(),
            "positions": "stored" if POSITIONS_KEY in names else "sinusoid",
            "layout": source_layout.name,
            "tensors": len(specs),
            "bytes": sum(s.nbytes for s in specs),
            "source": source or {"kind": "local", "name": root.name},
        }
        write_json_atomic(staging / ENCODER_JSON, summary)
    log.info("extracted %d tensors (%.1f MB) from %s", len(specs), summary["bytes"] / 1e6, root)
    return summary


class LazyWeights(Mapping[str, torch.Tensor]):
    """Tensors by canonical name, each read from the file when asked for (and not kept): a conversion that walks
    the layers one at a time holds one layer."""

    def __init__(self, path: Path, header: dict, dtype: torch.dtype) -> None:
        self._path, self._header, self._dtype = path, header, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_tensor(self._path, self._header[name]).to(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


def load_extracted(extracted_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32, lazy: bool = False):
    """(weights by canonical name in `dtype`, dims, encoder.json) from an extract stage output; `lazy`: the weights
    as a LazyWeights, read when used."""
    extracted_dir = Path(extracted_dir)
    meta_path = extracted_dir / ENCODER_JSON
    meta = read_json(meta_path)
    dims = family_module(family_of(meta)).dims_from_json(meta.get("dims", {}), str(meta_path))
    weights_path = extracted_dir / WEIGHTS_FILE
    header = read_header(weights_path)
    expected = dims.tensor_shapes()
    for name, shape in expected.items():
        if name not in header or header[name].shape != shape:
            found = list(header[name].shape) if name in header else "missing"
            raise VoxtralError(f"{weights_path}: tensor '{name}' is {found}, expected {list(shape)}")
    if lazy:
        return LazyWeights(weights_path, header, dtype), dims, meta
    weights = {name: read_tensor(weights_path, info).to(dtype) for name, info in header.items()}
    return weights, dims, meta
