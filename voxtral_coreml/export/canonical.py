"""Byte-reproducible packages: rewrite what coremltools makes different on every save.

Converting the same model twice gives the same weights and the same program, but not the same bytes:
- `Manifest.json` names each item by a random UUID (`uuid4`);
- the spec's `userDefined` metadata is a protobuf map, serialized in a different order in each process;
- the metadata holds `com.github.apple.coremltools.conversion_date`, the day of the conversion;
- `executorch_debug_handle_mapping.json` sits at the package root: an ExecuTorch debugging aid that
  Core ML never reads (it is not an item of the manifest), whose handles are all null for our programs.

After `canonicalize_package` the package holds only Manifest.json and the items it lists; item identifiers
are UUIDs derived from each item's path and content; the spec is serialized deterministically (map keys
sorted) without the date. The weight blob is already deterministic and is left as it is.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from voxtral_coreml.pipeline.atomic import remove_path, write_bytes_atomic
from voxtral_coreml.pipeline.errors import JSON_ERRORS, VoxtralError

from .package_info import SPEC_FILE

PACKAGE_MANIFEST = "Manifest.json"
CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"
# Fixed, so that the same content gets the same identifier in every package this project writes.
ITEM_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "voxtral-coreml/mlpackage-item")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a directory's files: relative path, size and bytes of each."""
    digest = hashlib.sha256()
    files = [(path, "")] if path.is_file() else [(f, f.relative_to(path).as_posix()) for f in _files(path)]
    for file, name in files:
        digest.update(f"{name}\0{file.stat().st_size}\n".encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def item_identifier(item_path: str, data_dir: Path) -> str:
    return str(uuid.uuid5(ITEM_ID_NAMESPACE, f"{item_path}:{content_digest(data_dir / item_path)}"))


def _read_manifest(package: Path) -> dict:
    path = package / PACKAGE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
        has_root = manifest["rootModelIdentifier"] in manifest["itemInfoEntries"]
    except (OSError, *JSON_ERRORS, KeyError, TypeError) as e:
        raise VoxtralError(f"{path}: not a Core ML package manifest ({type(e).__name__}: {e})") from None
    if not has_root:
        raise VoxtralError(f"{path}: rootModelIdentifier names no item")
    return manifest


def canonical_spec(package: Path) -> None:
    """The spec without the conversion date, serialized with map keys sorted."""
    from coremltools.proto import Model_pb2

    path = package / SPEC_FILE
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    metadata = spec.description.metadata.userDefined
    if CONVERSION_DATE_KEY in metadata:
        del metadata[CONVERSION_DATE_KEY]
    write_bytes_atomic(path, spec.SerializeToString(deterministic=True))


def drop_unlisted(package: Path, manifest: dict) -> None:
    """Remove every file that is neither Manifest.json nor inside an item the manifest lists."""
    items = [Path("Data") / entry["path"] for entry in manifest["itemInfoEntries"].values()]
    for file in _files(package):
        relative = file.relative_to(package)
        if relative != Path(PACKAGE_MANIFEST) and not any(relative.is_relative_to(item) for item in items):
            remove_path(file)
    for folder in sorted((p for p in package.rglob("*") if p.is_dir()), reverse=True):  # deepest first
        if not any(folder.iterdir()):
            folder.rmdir()


def canonical_manifest(package: Path, manifest: dict) -> dict:
    """The same items under identifiers derived from their path and content (call after the items are final)."""
    data_dir = package / "Data"
    renamed = {old: item_identifier(entry["path"], data_dir) for old, entry in manifest["itemInfoEntries"].items()}
    return {
        **manifest,
        "itemInfoEntries": {renamed[old]: entry for old, entry in manifest["itemInfoEntries"].items()},
        "rootModelIdentifier": renamed[manifest["rootModelIdentifier"]],
    }


def canonicalize_package(package: str | Path) -> None:
    """Rewrite a saved `.mlpackage` in place into its canonical bytes (idempotent)."""
    package = Path(package)
    manifest = _read_manifest(package)
    canonical_spec(package)
    drop_unlisted(package, manifest)
    # The layout coremltools writes (4-space indent, sorted keys, final newline), with derived identifiers.
    text = json.dumps(canonical_manifest(package, manifest), indent=4, sort_keys=True) + "\n"
    write_bytes_atomic(package / PACKAGE_MANIFEST, text.encode())
