"""The Voxtral 2507 family (Mini, Small): its entry in `families.FAMILIES`, pointing at the modules that hold it."""

from __future__ import annotations

from pathlib import Path

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


def default_variant(extracted_dir) -> str:
    from voxtral_coreml.export.convert import infer_variant

    from .dims import read_encoder_json

    return infer_variant(EncoderDims.from_json(read_encoder_json(extracted_dir)["dims"], str(extracted_dir)))


def encode(*args, **kwargs):
    from voxtral_coreml.encode import encode_windows

    return encode_windows(*args, **kwargs)


def package_name(variant: str) -> str:
    from voxtral_coreml.export.convert import package_name

    return package_name(variant)
