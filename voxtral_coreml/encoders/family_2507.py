"""The Voxtral 2507 family (Mini, Small): its entry in `families.FAMILIES`, pointing at the modules that hold it."""

from __future__ import annotations

import re
from pathlib import Path

from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.layouts import LAYOUTS

from .dims import EncoderDims

__all__ = [
    "LAYOUTS",
    "calibrate",
    "calibration_encoder",
    "compute_reference",
    "convert_package",
    "detect",
    "io_contract",
]

dims_from_json = EncoderDims.from_json


CANNOT_STREAM = "the 2507 encoders are bidirectional over 30 s windows and cannot stream"
VARIANT_IN_NAME = re.compile(r"VoxtralEncoder(Mini|Small)\.(mlpackage|aimodel)")


def detect(root: Path) -> bool:
    return True  # the default family: whatever no other family claims


def write_synthetic(*args, **kwargs) -> None:
    from voxtral_coreml.sources.download import write_synthetic

    write_synthetic(*args, **kwargs)


def compute_reference(*args, **kwargs):
    from .reference import compute_reference

    return compute_reference(*args, **kwargs)


def calibrate(*args, **kwargs):
    from voxtral_coreml.export.calibration import calibrate

    return calibrate(*args, **kwargs)


def calibration_encoder(*args, **kwargs):
    from voxtral_coreml.export.sensitivity import calibration_encoder

    return calibration_encoder(*args, **kwargs)


def convert_package(*args, **kwargs):
    from voxtral_coreml.export.convert import convert_package

    return convert_package(*args, **kwargs)


def convert_asset(*args, **kwargs):
    """The Core AI export (formats.py's coreai): the same ANE module as an .aimodel asset."""
    from voxtral_coreml.export.coreai import convert_asset

    return convert_asset(*args, **kwargs)


def io_contract(dims: EncoderDims, manifest: dict | None = None) -> dict:
    from voxtral_coreml.export.convert import io_contract

    return io_contract(dims)


def choose_variant(flag: str | None, extracted_dir, out: Path) -> str:
    """--variant, else the projector's width (Mini 3072, Small 5120), else the name --out gives the package."""
    from voxtral_coreml.export.convert import VARIANT_BY_HIDDEN_SIZE

    from .dims import read_encoder_json

    hidden_size = int(read_encoder_json(extracted_dir)["dims"]["hidden_size"])
    named = VARIANT_IN_NAME.fullmatch(out.name)
    variant = flag or VARIANT_BY_HIDDEN_SIZE.get(hidden_size) or (named and named.group(1))
    if not variant:
        raise VoxtralError(
            f"cannot tell Mini from Small for projector width {hidden_size}; pass --variant Mini|Small "
            "or name the output VoxtralEncoderMini.mlpackage or VoxtralEncoderSmall.mlpackage (or .aimodel)"
        )
    if named and named.group(1) != variant:
        raise VoxtralError(f"{out}: names a {named.group(1)} package, but this encoder is {variant}")
    return variant


def encode(*args, **kwargs):
    from voxtral_coreml.encode import encode_windows

    return encode_windows(*args, **kwargs)


def package_name(variant: str) -> str:
    from voxtral_coreml.export.convert import package_name

    return package_name(variant)
