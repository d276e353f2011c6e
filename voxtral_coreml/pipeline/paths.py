"""Where each stage's outputs live under artifacts/ (dvc.yaml names the same paths; a test keeps them equal)."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
MANIFEST = "manifest.json"  # beside every package: what it is, how it was made, how it measured
SWEEP_RESULT_FILE = "result.json"  # in each sweep result's folder, beside the package and its manifest


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


def calibration_file(model: str, recipe: str) -> Path:
    """A torch-compressed recipe's compressed weights (calibration.py); empty for other recipes."""
    return ARTIFACTS / "sensitivity" / model / f"{recipe}.safetensors"


def package_dir(model: str, recipe: str) -> Path:
    return ARTIFACTS / "packages" / model / recipe


def metrics_file(model: str, recipe: str) -> Path:
    return ARTIFACTS / "metrics" / model / f"{recipe}.json"


def timings_file(model: str, recipe: str) -> Path:
    """Not a DVC output: timings vary from run to run, and dvc.lock must not."""
    return ARTIFACTS / "timings" / model / f"{recipe}.json"


def streaming_dir(model: str, recipe: str, form: str, tokens_per_step: int) -> Path:
    """A Realtime streaming package: one per model, recipe, form and tokens per step (pipeline.streaming)."""
    return ARTIFACTS / "streaming" / model / f"{recipe}-{form}-k{tokens_per_step}"


def streaming_metrics_file(model: str, recipe: str, form: str, tokens_per_step: int) -> Path:
    return ARTIFACTS / "metrics" / "streaming" / model / f"{recipe}-{form}-k{tokens_per_step}.json"


def export_dir(fmt: str, model: str, recipe: str) -> Path:
    """A package in an export format other than Core ML's (formats.py), e.g. artifacts/coreai/<model>/<recipe>/."""
    return ARTIFACTS / fmt / model / recipe


def export_metrics_file(fmt: str, model: str, recipe: str) -> Path:
    return ARTIFACTS / "metrics" / fmt / model / f"{recipe}.json"


def export_timings_file(fmt: str, model: str, recipe: str) -> Path:
    return ARTIFACTS / "timings" / fmt / model / f"{recipe}.json"


def mel_package_dir(precision: str) -> Path:
    return ARTIFACTS / "mel" / precision


def mel_metrics_file(precision: str) -> Path:
    # Under metrics/, which the report depends on as a folder: building the mel package is what puts it there.
    return ARTIFACTS / "metrics" / "mel" / f"{precision}.json"


def report_file(folder: Path = ARTIFACTS) -> Path:
    """The report stage's table (folder: artifacts/), or the sweeps' (artifacts/sweeps/)."""
    return folder / "report.md"


def tradeoff_chart_file(folder: Path = ARTIFACTS) -> Path:
    """Package size vs PSNR per model, the Pareto front marked (next to its report.md, which shows it)."""
    return folder / "tradeoff.png"


def tradeoff_data_dir(folder: Path = ARTIFACTS) -> Path:
    """The same points as plot data, one <model>.json per model: dvc.yaml's `plots:` renders each as a chart."""
    return folder / "tradeoff"


def sweeps_dir() -> Path:
    """stages/sweep.py's results and caches (voxtral_coreml/export/sweep.py), and their report: outside DVC, shared by
    every sweep."""
    return ARTIFACTS / "sweeps"


def sweep_results_dir() -> Path:
    return sweeps_dir() / "results"
