"""The download stage: materialize a model's checkpoint from its configured source.

- synthetic: generated in the real HF layout from the dimensions in conf/model/.
- local: a directory the user already has; recorded by path and a fingerprint (sizes and mtimes), so a
  checkpoint changed in place after download is caught by extract instead of silently converted.
- hub: the Hugging Face Hub: only the audio tensors' byte ranges are fetched (see hub.py).
- whisper-ct2: a trained Whisper encoder (a CTranslate2 model.bin from installed packages) in the HF layout, with a
  seeded projector to `hidden_size` (see whisper_ct2.py): trained weights for measuring compression.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from voxtral_coreml.encoders.dims import EncoderDims
from voxtral_coreml.encoders.families import DEFAULT_FAMILY, family_module
from voxtral_coreml.pipeline.atomic import atomic_path, write_json_atomic
from voxtral_coreml.pipeline.errors import VoxtralError

from .layouts import is_encoder_tensor_any_layout, open_layout, read_json
from .synthetic import LanguageModelShape, write_synthetic_checkpoint

log = logging.getLogger(__name__)

SOURCE_JSON = "source.json"
SOURCE_KINDS = ("synthetic", "local", "hub", "whisper-ct2")
# What manifests may carry about a source: no local paths, no per-file details.
PUBLIC_SOURCE_KEYS = ("kind", "model", "seed", "name", "repo_id", "revision", "commit", "layout", "packages")


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise VoxtralError(f"{where}: missing '{key}'")
    return cfg[key]


def synthetic_dims(cfg: dict[str, Any], where: str) -> EncoderDims:
    d = _require(cfg, "dims", where)
    try:
        return EncoderDims(
            d_model=int(d["d_model"]),
            n_layers=int(d["n_layers"]),
            n_heads=int(d["n_heads"]),
            ffn_dim=int(d.get("ffn_dim", 4 * int(d["d_model"]))),
            hidden_size=int(d["hidden_size"]),
        )
    except KeyError as e:
        raise VoxtralError(f"{where}.dims: missing {e}") from None


def write_synthetic(out_dir: Path, source: dict[str, Any], where: str) -> None:
    """The 2507 family's synthetic checkpoint from `models.<model>.source` (dims, language_model, seed)."""
    dims = synthetic_dims(source, where)
    lm = LanguageModelShape(**_require(source, "language_model", where))
    write_synthetic_checkpoint(out_dir, dims, lm, seed=int(_require(source, "seed", where)))


def _write_whisper(model: str, source: dict[str, Any], where: str, staging: Path) -> dict[str, Any]:
    from .whisper_ct2 import installed_parts, write_whisper_checkpoint

    packages = _require(source, "packages", where)
    if not isinstance(packages, list) or not packages or not all(isinstance(p, str) for p in packages):
        raise VoxtralError(f"{where}.packages: expected a list of package names, got {packages!r}")
    seed, hidden = int(_require(source, "seed", where)), int(_require(source, "hidden_size", where))
    dims = write_whisper_checkpoint(staging, installed_parts(packages), hidden, seed)
    log.info("trained Whisper encoder %s from %s (%d layers, d_model %d)", model, packages, dims.n_layers, dims.d_model)
    return {"kind": "whisper-ct2", "model": model, "seed": seed, "packages": packages}


def fingerprint(root: Path) -> dict[str, list[int]]:
    """Relative path -> [size, mtime_ns] of every file: cheap, and changes when a file is rewritten."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _write_synthetic(model: str, source: dict[str, Any], where: str, staging: Path) -> dict[str, Any]:
    family = source.get("family", DEFAULT_FAMILY)
    family_module(family).write_synthetic(staging, source, where)
    log.info("generated synthetic %s checkpoint %s", family, model)
    return {"kind": "synthetic", "model": model, "seed": source["seed"]}


def _use_local(model: str, source: dict[str, Any], where: str, staging: Path) -> dict[str, Any]:
    root = Path(_require(source, "path", where)).expanduser().resolve()
    open_layout(root, source.get("layout", "auto")).dims()  # fail now, with the layout's message
    log.info("using local checkpoint %s", root)
    return {"kind": "local", "name": root.name, "path": str(root), "fingerprint": fingerprint(root)}


# Source kind -> what writes its download directory and returns its source.json (hub fetches on its own).
WRITERS = {"synthetic": _write_synthetic, "local": _use_local, "whisper-ct2": _write_whisper}


def materialize_checkpoint(model: str, source: dict[str, Any], out_dir: str | os.PathLike[str]) -> None:
    where = f"models.{model}.source"
    kind = _require(source, "kind", where)
    if kind not in SOURCE_KINDS:
        raise VoxtralError(f"{where}.kind: unknown source {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if kind == "hub":
        from .hub import fetch_tensors

        repo_id, revision = _require(source, "repo_id", where), str(_require(source, "revision", where))
        fetch_tensors(repo_id, revision, Path(out_dir), wanted=is_encoder_tensor_any_layout)
        return
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        write_json_atomic(staging / SOURCE_JSON, WRITERS[kind](model, source, where, staging))


def checkpoint_root(download_dir: str | os.PathLike[str]) -> Path:
    """Where the checkpoint's files are: the download output, or the local directory it points to."""
    download_dir = Path(download_dir)
    info = read_json(download_dir / SOURCE_JSON)
    if info.get("kind") != "local":
        return download_dir
    root = Path(info["path"])
    if not root.is_dir():
        raise VoxtralError(f"{root}: local checkpoint directory not found")
    if fingerprint(root) != info["fingerprint"]:
        raise VoxtralError(
            f"{root}: the local checkpoint changed after download; rerun its download stage "
            "(dvc repro -f -s download@<model>)"
        )
    return root


def public_source_info(download_dir: str | os.PathLike[str]) -> dict[str, Any]:
    info = read_json(Path(download_dir) / SOURCE_JSON)
    return {k: info[k] for k in PUBLIC_SOURCE_KEYS if k in info}
