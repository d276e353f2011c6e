"""Sweep jobs outside DVC: one conversion per configuration, every product stored under the sha256 of its inputs.

stages/sweep.py runs one job per configuration of a Hydra multirun, in parallel or on a cluster. All jobs share one
root (artifacts/sweeps/), where each product is keyed by canonical JSON of what determines it:

    models/<source key>/extracted/      the audio tower, extracted once per model source
    references/<reference key>/         transformers' and the ANE module's embeddings on the speech window
    sensitivity/<scan key>.json         a mixed recipe's scan, once per weights and scan settings
    results/<result key>/               the package, manifest.json and result.json (config, metrics, size)

A product appears whole (atomic rename) and is made once (atomic.build_once): jobs that need the same product
wait on its lock file, and a job that finds its result already there logs "cached: <key>" and builds nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from voxtral_coreml.check.backends import resolve_backend
from voxtral_coreml.check.validate import REFERENCE_FILE, load_reference, validate_package
from voxtral_coreml.encoders.dims import read_encoder_json
from voxtral_coreml.encoders.reference import check_parity, compute_reference, save_reference
from voxtral_coreml.pipeline.atomic import build_once, remove_path, write_json_atomic
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.paths import SWEEP_RESULT_FILE
from voxtral_coreml.sources.download import checkpoint_root, fingerprint, materialize_checkpoint, public_source_info
from voxtral_coreml.sources.extract import extract_audio_tower
from voxtral_coreml.sources.layouts import read_json

from .canonical import content_digest
from .convert import MANIFEST, convert_package, package_name, versions
from .recipes import Recipe

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
# Hydra overrides that choose the configuration rather than change it: not part of a result's label.
SELECTION_KEYS = ("model", "recipe")


def content_key(spec: Any) -> str:
    """sha256 of canonical JSON: the same configuration gives the same key however its overrides were written."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def audio_id(audio: str | os.PathLike[str] | None) -> str | None:
    """The validation audio by content: None is the built-in clip (which comes with this project's version)."""
    if audio is None:
        return None
    path = Path(audio)
    if not path.is_file():
        raise VoxtralError(f"validation.audio: {path} not found")
    return content_digest(path)


def label_of(recipe: str, overrides: list[str]) -> str:
    """What tells this point from the others: the recipe and every override that changed the configuration
    ("pal4g group_size=8"); recipe parameters drop their `recipe.` prefix."""
    changed = [o.removeprefix("recipe.") for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SELECTION_KEYS]
    return " ".join([recipe, *changed])


@dataclasses.dataclass(frozen=True)
class SweepJob:
    """One configuration of a sweep: conf/sweep.yaml composed with the job's overrides."""

    model: str
    variant: str
    source: dict[str, Any]
    recipe: Recipe
    build: dict[str, Any]  # conf/conversion.yaml's sections
    sensitivity: dict[str, Any]
    validation: dict[str, Any]
    label: str

    @classmethod
    def from_config(cls, cfg: dict[str, Any], choices: dict[str, str], overrides: list[str]) -> SweepJob:
        """`choices` are Hydra's group choices (the model's and recipe's names), `overrides` the job's own."""
        model, recipe = choices["model"], choices["recipe"]
        for key in ("variant", "source"):
            if key not in cfg["model"]:
                raise VoxtralError(f"model '{model}': missing '{key}'")
        return cls(
            model=model,
            variant=cfg["model"]["variant"],
            source=cfg["model"]["source"],
            recipe=Recipe.from_config(recipe, cfg["recipe"]),
            build=cfg["build"],
            sensitivity=cfg["sensitivity"],
            validation=cfg["validation"],
            label=label_of(recipe, overrides),
        )


def source_spec(model: str, source: dict[str, Any]) -> dict[str, Any]:
    """What an extraction depends on: the source as configured and, for a local directory, its files' sizes and
    mtimes, so a checkpoint changed in place gets a new key."""
    spec = {"model": model, "source": source}
    if source.get("kind") == "local" and "path" in source:
        spec["fingerprint"] = fingerprint(Path(source["path"]).expanduser().resolve())
    return spec


def ensure_extracted(root: Path, model: str, source: dict[str, Any]) -> Path:
    folder = root / "models" / content_key(source_spec(model, source))

    def extract(staging: Path) -> None:
        download = folder / "checkpoint"  # a fixed place, so that an interrupted Hub download resumes
        materialize_checkpoint(model, source, download)
        layout = source.get("layout", "auto")
        extract_audio_tower(checkpoint_root(download), staging, layout=layout, source=public_source_info(download))
        remove_path(download)  # jobs read the extraction only

    build_once(folder / "extracted", extract)
    return folder / "extracted"


def ensure_reference(root: Path, job: SweepJob, extracted: Path, weights_sha256: str) -> tuple[Path, dict]:
    """The reference embeddings and the ANE module's parity, gated as the build stage gates them."""
    audio, attention, chunk = job.validation["audio"], job.build["attention"], job.build["query_chunk"]
    spec = {"weights_sha256": weights_sha256, "audio": audio_id(audio), "attention": attention, "query_chunk": chunk}
    folder = root / "references" / content_key({**spec, "versions": versions()})

    def compute(staging: Path) -> None:
        tensors, parity = compute_reference(extracted, audio, attention, chunk)
        staging.mkdir()
        save_reference(staging / REFERENCE_FILE, tensors)
        write_json_atomic(staging / PARITY_FILE, parity)

    build_once(folder, compute)
    parity = read_json(folder / PARITY_FILE)
    check_parity(job.model, parity, job.build["parity_gate_db"])
    return folder / REFERENCE_FILE, parity


def ensure_sensitivity(root: Path, job: SweepJob, extracted: Path, weights_sha256: str) -> dict:
    """A mixed recipe's scan, shared by every recipe with the same scan settings (target_bits only re-chooses)."""
    from .sensitivity import scan_sensitivity, scan_settings

    frames, audio = job.sensitivity["frames"], job.validation["audio"]
    spec = {"weights_sha256": weights_sha256, **scan_settings(job.recipe), "frames": frames, "audio": audio_id(audio)}
    path = root / "sensitivity" / f"{content_key({**spec, 'versions': versions()})}.json"

    def scan(staging: Path) -> None:
        table = scan_sensitivity(extracted, job.recipe, frames=frames, audio=audio, jobs=job.sensitivity["jobs"])
        write_json_atomic(staging, table)

    build_once(path, scan)
    return read_json(path)


def result_spec(job: SweepJob, weights_sha256: str) -> dict[str, Any]:
    """Everything a result depends on: the resolved configuration, the input weights and the converters' versions."""
    return {
        "model": {"name": job.model, "variant": job.variant, "source": job.source},
        "weights_sha256": weights_sha256,
        "recipe": dataclasses.asdict(job.recipe),
        "build": {"attention": job.build["attention"], "query_chunk": job.build["query_chunk"]},
        "sensitivity": {"frames": job.sensitivity["frames"]} if job.recipe.needs_scan else None,
        "validation": {
            "audio": audio_id(job.validation["audio"]),
            "backend": resolve_backend(job.validation["backend"]),
        },
        "versions": versions(),
    }


def run_job(job: SweepJob, root: Path) -> dict[str, Any]:
    """The job's result, from root/results/<key>/ if a complete one is there, else converted and validated now."""
    extracted = ensure_extracted(root, job.model, job.source)
    weights_sha256 = str(read_encoder_json(extracted)["weights_sha256"])
    spec = result_spec(job, weights_sha256)
    key = content_key(spec)
    folder = root / "results" / key
    if not build_once(folder, lambda staging: _convert_and_validate(job, spec, key, extracted, root, staging)):
        log.info("cached: %s (%s %s)", key, job.model, job.label)
    result = read_json(folder / SWEEP_RESULT_FILE)
    psnr, size_mb = result["metrics"]["psnr_db"], result["size_bytes"] / 1e6
    log.info("%s %s: %.1f MB, PSNR %s dB: %s", job.model, job.label, size_mb, psnr, folder)
    return result


def _convert_and_validate(job: SweepJob, spec: dict, key: str, extracted: Path, root: Path, staging: Path) -> None:
    started = time.time()
    log.info("building: %s (%s %s)", key, job.model, job.label)
    weights_sha256 = spec["weights_sha256"]
    sensitivity = ensure_sensitivity(root, job, extracted, weights_sha256) if job.recipe.needs_scan else None
    reference, parity = ensure_reference(root, job, extracted, weights_sha256)
    staging.mkdir()
    manifest = convert_package(
        extracted,
        staging / package_name(job.variant),
        job.recipe,
        model_name=job.model,
        variant=job.variant,
        attention=job.build["attention"],
        query_chunk=job.build["query_chunk"],
        sensitivity=sensitivity,
    )
    metrics, timings = validate_package(
        staging, load_reference(reference), job.recipe.psnr_gate_db, spec["validation"]["backend"], enforce_gate=False
    )
    result = {
        "key": key,
        "config": spec,  # what the key is the sha256 of
        "label": job.label,
        "package": manifest["package"],
        "manifest": MANIFEST,
        "size_bytes": manifest["size_bytes"],
        "average_bits": manifest["compression"]["average_bits"],
        "metrics": metrics,
        "passed_gate": metrics["psnr_db"] >= job.recipe.psnr_gate_db,
        "parity": parity,
        "timings": timings,
        "job": {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "finished": time.time()},
    }
    write_json_atomic(staging / SWEEP_RESULT_FILE, result)
