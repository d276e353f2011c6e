"""Reading a saved .mlpackage back into a MIL Program on Linux, with errors that say what is wrong."""

import json
from dataclasses import dataclass
from pathlib import Path

from coremltools import proto
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
from coremltools.converters.mil.mil import Program

from voxtral_coreml.pipeline.errors import JSON_ERRORS, VoxtralError


@dataclass(frozen=True)
class LoadedPackage:
    program: Program
    spec: proto.Model_pb2.Model


def _root_model_path(package: Path) -> Path:
    """The spec file the package's Manifest.json names as its root model."""
    manifest_path = package / "Manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        entry = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
        item = entry["path"]
    except (OSError, *JSON_ERRORS, LookupError, TypeError) as exc:  # LookupError: a list indexed
        raise VoxtralError(f"{package}: unreadable Manifest.json ({exc})") from exc
    # Packages come from anywhere: the spec read must be inside this one, wherever its manifest points.
    if not isinstance(item, str) or not item or item.startswith("/") or "\\" in item or ".." in Path(item).parts:
        raise VoxtralError(f"{manifest_path}: refusing root model path {item!r} (it must stay inside the package)")
    return package / "Data" / item


def read_package(path: str | Path) -> LoadedPackage:
    """Parse the spec and rebuild its MIL program, reading weights from the package's weights folder."""
    package = Path(path)
    if not package.is_dir():
        raise VoxtralError(f"{package}: not an .mlpackage directory")
    spec_path = _root_model_path(package)
    spec = proto.Model_pb2.Model()
    try:
        spec.ParseFromString(spec_path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, or a missing file
        raise VoxtralError(f"{package}: model spec {spec_path.name} is missing or corrupt ({exc})") from exc
    if spec.WhichOneof("Type") != "mlProgram":
        raise VoxtralError(f"{package}: not an ML program (model type {spec.WhichOneof('Type')!r})")
    # Weight blobs are named "@model_path/weights/<file>"; the loader joins the file name to this folder.
    weights = spec_path.parent / "weights"
    try:
        program = load_milproto(spec, spec.specificationVersion, str(weights))
    except Exception as exc:  # missing / truncated weight.bin, ops coremltools cannot rebuild, ...
        raise VoxtralError(f"{package}: cannot rebuild the MIL program ({type(exc).__name__}: {exc})") from exc
    return LoadedPackage(program, spec)
