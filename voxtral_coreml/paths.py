"""Where each stage's outputs live under artifacts/ (dvc.yaml names the same paths; a test keeps them equal)."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")


def checkpoint_dir(model: str) -> Path:
    return ARTIFACTS / "checkpoints" / model


def extracted_dir(model: str) -> Path:
    return ARTIFACTS / "extracted" / model


def reference_file(model: str) -> Path:
    return ARTIFACTS / "reference" / model / "reference.safetensors"


def parity_file(model: str) -> Path:
    return ARTIFACTS / "reference" / model / "parity.json"


def sensitivity_file(model: str, recipe: str) -> Path:
    return ARTIFACTS / "sensitivity" / model / f"{recipe}.json"


def package_dir(model: str, recipe: str) -> Path:
    return ARTIFACTS / "packages" / model / recipe


def metrics_file(model: str, recipe: str) -> Path:
    return ARTIFACTS / "metrics" / model / f"{recipe}.json"


def timings_file(model: str, recipe: str) -> Path:
    """Not a DVC output: timings vary from run to run, and dvc.lock must not."""
    return ARTIFACTS / "timings" / model / f"{recipe}.json"


def mel_package_dir(precision: str) -> Path:
    return ARTIFACTS / "mel" / precision


def mel_metrics_file(precision: str) -> Path:
    # Under metrics/, which the report depends on as a folder: building the mel package is what puts it there.
    return ARTIFACTS / "metrics" / "mel" / f"{precision}.json"


def report_file() -> Path:
    return ARTIFACTS / "report.md"


def sweeps_dir() -> Path:
    """stages/sweep.py's results and caches (voxtral_coreml/sweep.py): outside DVC, shared by every sweep."""
    return ARTIFACTS / "sweeps"


def sweep_results_dir() -> Path:
    return sweeps_dir() / "results"
