"""One table over every package the pipeline built: size, contract, and accuracy against transformers; and
package size vs accuracy per model (table, PNG, plot data), for the pipeline alone or with every sweep result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from voxtral_coreml.numerics.stable import FLOAT64_RESOLUTION_DB
from voxtral_coreml.pipeline.atomic import write_text_atomic
from voxtral_coreml.pipeline.errors import read_json
from voxtral_coreml.pipeline.paths import (
    ARTIFACTS,
    export_metrics_file,
    mel_metrics_file,
    metrics_file,
    parity_file,
    report_file,
    streaming_metrics_file,
    sweep_results_dir,
    sweeps_dir,
    tradeoff_chart_file,
    tradeoff_data_dir,
)

from .markdown import shape_text, table_head, table_row
from .tradeoff import Point, collect_points, pipeline_points, tradeoff_table, write_chart, write_plot_data


def package_table(
    models: list[str], recipes: list[str], metrics_path: Callable[[str, str], Path] = metrics_file
) -> list[str]:
    header = ["model", "recipe", "output", "size (MB)", "target", "backend", "PSNR vs transformers (dB)"]
    header += ["cosine min", "max abs err", "PSNR vs ANE module (dB)", "gate (dB)"]
    lines = table_head(header)
    for model in models:
        for recipe in recipes:
            m = read_json(metrics_path(model, recipe))
            size_mb = f"{m['size_bytes'] / 1e6:.1f}"
            cells = [model, recipe, shape_text(m["output_shape"]), size_mb, m["deployment_target"], m["backend"]]
            cells += [m["psnr_db"], m["cosine_min"], m["max_abs_err"], m["vs_ane_module"]["psnr_db"], m["gate_db"]]
            lines.append(table_row(cells))
    return lines


def parity_table(models: list[str]) -> list[str]:
    lines = table_head(["model", "PSNR (dB)", "cosine min", "max abs err"])
    for model in models:
        p = read_json(parity_file(model))
        lines.append(table_row([model, p["psnr_db"], p["cosine_min"], p["max_abs_err"]]))
    return lines


def mel_section(precisions: list[str]) -> list[str]:
    """The mel front-end packages, if the pipeline builds any."""
    if not precisions:
        return []
    header = ["compute", "size (MB)", "target", "backend", "PSNR vs WhisperFeatureExtractor (dB)", "max abs err"]
    header += ["gate (dB)"]
    lines = table_head(header)
    for precision in precisions:
        m = read_json(mel_metrics_file(precision))
        size_mb = f"{m['size_bytes'] / 1e6:.1f}"
        cells = [precision, size_mb, m["deployment_target"], m["backend"], m["psnr_db"], m["max_abs_err"], m["gate_db"]]
        lines.append(table_row(cells))
    return [
        "## Mel front-end (`VoxtralMelSpectrogram.mlpackage`)",
        "",
        "30 s of 16 kHz audio -> `mel_spectrogram [1,128,3000]`, on the speech clip's first 30 s. Its log floor is",
        "per window: for clips over 30 s, VoxtralProcessor's (per clip) can differ.",
        "",
        *lines,
        "",
    ]


def streaming_section(streaming: dict | None) -> list[str]:
    """The Realtime streaming packages, if the pipeline builds any."""
    if not streaming or not streaming.get("models"):
        return []
    header = ["model", "recipe", "form", "tokens/step", "size (MB)", "target", "state (MB)", "steps", "backend"]
    header += ["PSNR vs transformers' streaming (dB)", "cosine min", "gate (dB)"]
    lines = table_head(header)
    for model in streaming["models"]:
        for recipe in streaming["recipes"]:
            for form in streaming["forms"]:
                for k in streaming["tokens_per_step"]:
                    m = read_json(streaming_metrics_file(model, recipe, form, k))
                    cells = [model, recipe, form, k, f"{m['size_bytes'] / 1e6:.1f}", m["deployment_target"]]
                    cells += [f"{m['state_bytes'] / 1e6:.2f}", m["steps"], m["backend"], m["psnr_db"]]
                    cells += [m["cosine_min"], m["gate_db"]]
                    lines.append(table_row(cells))
    return [
        "## Voxtral Realtime streaming packages",
        "",
        "The speech clip fed k x 80 ms per call (the ring buffer wraps past the 750-position window), compared",
        "with transformers' own streaming `get_audio_features` (`padding_cache`, `cache`) fed the same chunks.",
        "",
        *lines,
        "",
    ]


def coreai_section(models: list[str], recipes: list[str]) -> list[str]:
    """The Core AI assets, if the pipeline builds any: the same table, run by Apple's Core AI runtime."""
    if not models or not recipes:
        return []
    lines = package_table(models, recipes, lambda model, recipe: export_metrics_file("coreai", model, recipe))
    return [
        "## Core AI assets (`.aimodel`, iOS / macOS 27)",
        "",
        "The same module and I/O contract as the Core ML packages, exported with coreai-torch and compressed with",
        "coreai-opt; run by Apple's Core AI runtime (coreai-core: its CPU runtime on Linux), same reference and gates.",
        "",
        *lines,
        "",
    ]


def tradeoff_section(points: list[Point]) -> list[str]:
    chart = tradeoff_chart_file(Path("."))  # the report's folder holds the chart
    return [
        "## Package size vs PSNR",
        "",
        "Per model, PSNR vs transformers over package size. On the Pareto front: no other package is as small",
        "and at least as accurate. Below its recipe's gate: (below).",
        "",
        f"![package size vs PSNR per model]({chart.as_posix()})",
        "",
        *tradeoff_table(points),
        "",
    ]


def render_report(
    models: list[str],
    recipes: list[str],
    mel_precisions: list[str],
    points: list[Point],
    streaming: dict | None = None,
    coreai: dict | None = None,
) -> str:
    """The report stage's: every pipeline package, the ANE module's parity, the mel packages, the trade-off."""
    return "\n".join(
        [
            "# Voxtral Core ML encoder packages",
            "",
            "Each package's `audio_embeddings` on one 30 s window of speech, compared with transformers'",
            "`get_audio_features` (float64) and with the ANE-layout PyTorch module it was converted from.",
            "",
            *package_table(models, recipes),
            "",
            "## ANE module vs transformers (float64, before conversion)",
            "",
            f"Reported up to {FLOAT64_RESOLUTION_DB:g} dB: beyond it the two differ by float64 rounding alone.",
            "",
            *parity_table(models),
            "",
            *mel_section(mel_precisions),
            *streaming_section(streaming),
            *coreai_section((coreai or {}).get("models", []), (coreai or {}).get("recipes", [])),
            *tradeoff_section(points),
        ]
    )


def render_sweep_report(points: list[Point]) -> str:
    """The sweeps': the trade-off over the pipeline's packages (if built) and every sweep result."""
    return "\n".join(
        [
            "# Voxtral Core ML encoder packages: sweeps",
            "",
            "The pipeline's packages (`artifacts/packages/`) and every sweep result (`artifacts/sweeps/results/`),",
            "each validated against transformers' `get_audio_features` (float64) on one 30 s window of speech.",
            "",
            *tradeoff_section(points),
        ]
    )


def _write_report(folder: Path, text: str, points: list[Point]) -> None:
    """report.md, and next to it the chart it shows and the chart's plot data."""
    write_chart(tradeoff_chart_file(folder), points)
    write_plot_data(tradeoff_data_dir(folder), points)
    write_text_atomic(report_file(folder), text)


def write_pipeline_report(pipeline: dict) -> str:
    """The report stage's outputs, from the pipeline's packages only: a DVC output follows from its deps alone,
    so dvc.lock stays the same whatever sweeps ran on this machine."""
    points = pipeline_points(pipeline["models"], pipeline["recipes"])
    streaming, coreai = pipeline.get("streaming"), pipeline.get("coreai")
    text = render_report(pipeline["models"], pipeline["recipes"], pipeline["mel"], points, streaming, coreai)
    _write_report(ARTIFACTS, text, points)
    return text


def write_sweeps_report(pipeline: dict) -> str:
    """artifacts/sweeps/'s report (outside DVC, as sweeps are): the pipeline's packages that exist, and every
    sweep result."""
    points = collect_points(pipeline["models"], pipeline["recipes"], sweep_results_dir())
    text = render_sweep_report(points)
    _write_report(sweeps_dir(), text, points)
    return text
