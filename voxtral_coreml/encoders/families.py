"""Encoder families: each is a module with the same functions, found here by name; nothing else branches on it.

A family module provides: `LAYOUTS` (name -> Layout class), `detect(root)`, `dims_from_json(data, source)`,
`compute_reference(extracted_dir, audio, attention, query_chunk)`, `calibrate(extracted_dir, recipe, jobs)` (a
data-aware recipe's compressed weights), `convert_package(...)` (Core ML), `convert_asset(...)` (Core AI),
`io_contract(dims)`, `encode_audio(...)`, `choose_variant(flag, extracted_dir, out)` (the package's variant name)
and `CANNOT_STREAM` (why it has no streaming packages, or None). The extracted encoder.json and every manifest
record the family.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from voxtral_coreml.pipeline.errors import VoxtralError

FAMILIES = {"2507": "voxtral_coreml.encoders.family_2507", "realtime": "voxtral_coreml.encoders.realtime.family"}
DEFAULT_FAMILY = "2507"  # what an encoder.json or manifest without a 'family' key describes
FAMILY_NAMES = {"2507": "Voxtral 2507 (Mini/Small)", "realtime": "Voxtral Realtime"}


def family_module(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise VoxtralError(f"unknown encoder family {name!r}; choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def family_of(meta: dict) -> str:
    """The family an encoder.json or a manifest describes."""
    name = meta.get("family", DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise VoxtralError(f"unknown encoder family {name!r}; choose one of {', '.join(FAMILIES)}")
    return name


def detect_family(root: Path, wanted: str = "auto") -> str:
    """The family of a checkpoint directory; a `wanted` family that is not the checkpoint's is one clear error."""
    found = next((name for name in FAMILIES if name != DEFAULT_FAMILY and family_module(name).detect(root)), None)
    found = found or DEFAULT_FAMILY
    if wanted not in ("auto", found):
        family_module(wanted)  # an unknown name is its own error
        raise VoxtralError(
            f"{root}: this is a {FAMILY_NAMES[found]} checkpoint, not {FAMILY_NAMES[wanted]} (--family {wanted}); "
            f"use --family {found} or auto"
        )
    return found


def family_of_extracted(extracted_dir) -> ModuleType:
    """The family module of an extract stage output (its encoder.json says which)."""
    from .dims import read_encoder_json

    return family_module(family_of(read_encoder_json(extracted_dir)))
