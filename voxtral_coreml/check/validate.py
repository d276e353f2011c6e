"""Check a package: its structure against the contract, and its embeddings against transformers.

The reference (transformers' embeddings and the ANE module's, on one real-speech window; reference.py) is
computed once per model by the build stage; each package is then compared with it by the backend that can run it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from voxtral_coreml.encoders.families import family_module, family_of
from voxtral_coreml.export.convert import MANIFEST
from voxtral_coreml.export.formats import FORMATS, SUFFIXES, format_of
from voxtral_coreml.numerics.metrics import compare_embeddings
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.layouts import read_json
from voxtral_coreml.sources.safetensors_io import read_header, read_tensor

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.safetensors"


def load_reference(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    return {name: read_tensor(path, info) for name, info in read_header(path).items()}


def _is_io(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(type(d) is int and d >= 0 for d in entry["shape"])
    )


def read_manifest(path: Path) -> dict:
    """A package's manifest.json with every field its readers use checked: packages come from anywhere."""
    manifest = read_json(path)
    name = manifest.get("package")
    # A plain name: the package must be beside its manifest, never somewhere a hostile manifest points to.
    fmt = format_of(name) if isinstance(name, str) else None
    if fmt is None or Path(name).name != name or "\\" in name:
        kinds = " or ".join(f"an {f.suffix}" for f in FORMATS.values())
        raise VoxtralError(f"{path}: 'package' is {name!r}, expected the name of {kinds} beside it")
    for key in ("inputs", "outputs"):
        if not isinstance(manifest.get(key), list) or not all(map(_is_io, manifest[key])):
            raise VoxtralError(f"{path}: '{key}' must be a list of {{name, shape, dtype}} objects")
    target = manifest.get("deployment_target")
    key = fmt.target_key
    if not isinstance(target, dict) or not isinstance(target.get(key), str) or target[key] not in fmt.targets:
        found = target.get(key) if isinstance(target, dict) else target
        raise VoxtralError(f"{path}: unknown deployment target {found!r}; expected one of {', '.join(fmt.targets)}")
    if not all(isinstance(target.get(os_name), str) for os_name in ("ios", "macos")):
        raise VoxtralError(f"{path}: deployment_target needs the 'ios' and 'macos' versions")
    size = manifest.get("size_bytes")
    if type(size) is not int or size < 0:
        raise VoxtralError(f"{path}: 'size_bytes' is {size!r}, expected a byte count")
    for key in ("dims", "recipe", "source"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise VoxtralError(f"{path}: '{key}' must be an object")
    if "recipe" in manifest and not isinstance(manifest["recipe"].get("name"), str):
        raise VoxtralError(f"{path}: 'recipe' has no name")
    return manifest


def find_package(package_dir: Path) -> tuple[Path, dict]:
    """A package folder (holding manifest.json) or the package itself (.mlpackage, .aimodel) -> (package, manifest)."""
    folder = package_dir.parent if package_dir.suffix in SUFFIXES else package_dir
    manifest = read_manifest(folder / MANIFEST)
    package = folder / manifest["package"]
    if not package.is_dir():
        raise VoxtralError(f"{folder / MANIFEST}: names package '{manifest['package']}', which is missing")
    return package, manifest


def check_structure(package: Path, manifest: dict, structure: dict, contract: dict) -> None:
    """The package's I/O is the contract, and its program is for its deployment target."""
    for key in ("inputs", "outputs"):
        if structure[key] != contract[key]:
            raise VoxtralError(f"{package}: {key} are {structure[key]}, the contract is {contract[key]}")
    format_of(package.name).check_target(package, manifest, structure)


def validate_package(
    package_dir: str | os.PathLike[str],
    reference: dict[str, torch.Tensor],
    gate_db: float,
    backend: str = "auto",
    *,
    enforce_gate: bool = True,
) -> tuple[dict[str, object], dict[str, float]]:
    """(metrics, timings) of one package; raises VoxtralError when it breaks the contract or (with `enforce_gate`)
    falls below the gate.

    Metrics depend only on the package and the reference, so rebuilds reproduce them byte for byte; timings
    depend on the machine and are kept apart. A sweep measures points below the gate too: `enforce_gate=False`."""
    package, manifest = find_package(Path(package_dir))
    fmt = format_of(package.name)
    structure = fmt.structure(package)
    family = family_module(family_of(manifest))
    dims = family.dims_from_json(manifest.get("dims", {}), f"{package.parent / MANIFEST}: dims")
    check_structure(package, manifest, structure, family.io_contract(dims, manifest))
    backend = fmt.resolve_backend(backend, "validation.backend")
    log.info("validating %s with the %s backend", package, backend)
    embeddings, timings = fmt.run(backend, package, reference["mel"])
    embeddings = embeddings.reshape(reference["transformers"].shape).float()
    nonfinite = (~torch.isfinite(embeddings)).sum().item()
    if nonfinite:
        raise VoxtralError(f"{package}: {nonfinite} of {embeddings.numel()} embedding values are NaN or Inf")
    metrics: dict[str, object] = {
        **compare_embeddings(reference["transformers"], embeddings),
        "vs_ane_module": compare_embeddings(reference["ane_module"], embeddings),
        "backend": backend,
        "gate_db": gate_db,
        "size_bytes": manifest.get("size_bytes"),
        "deployment_target": manifest["deployment_target"][fmt.target_key],
        "output_shape": structure["outputs"][0]["shape"],
        "ops_total": sum(structure["ops"].values()),
    }
    if enforce_gate and metrics["psnr_db"] < gate_db:
        raise VoxtralError(
            f"{package}: PSNR {metrics['psnr_db']} dB vs transformers is below the gate of {gate_db} dB "
            f"(cosine_min {metrics['cosine_min']}, max_abs_err {metrics['max_abs_err']})"
        )
    return metrics, timings
