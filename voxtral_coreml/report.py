"""One table over every package the pipeline built: size, contract, and accuracy against transformers."""

from __future__ import annotations

from .layouts import read_json
from .paths import mel_metrics_file, metrics_file, parity_file


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _shape(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def package_table(models: list[str], recipes: list[str]) -> list[str]:
    header = ["model", "recipe", "output", "size (MB)", "target", "backend", "PSNR vs transformers (dB)"]
    header += ["cosine min", "max abs err", "PSNR vs ANE module (dB)", "gate (dB)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for model in models:
        for recipe in recipes:
            m = read_json(metrics_file(model, recipe))
            size_mb = f"{m['size_bytes'] / 1e6:.1f}"
            cells = [model, recipe, _shape(m["output_shape"]), size_mb, m["deployment_target"], m["backend"]]
            cells += [m["psnr_db"], m["cosine_min"], m["max_abs_err"], m["vs_ane_module"]["psnr_db"], m["gate_db"]]
            lines.append(_row(cells))
    return lines


def parity_table(models: list[str]) -> list[str]:
    lines = [_row(["model", "PSNR (dB)", "cosine min", "max abs err"]), _row(["---"] * 4)]
    for model in models:
        p = read_json(parity_file(model))
        lines.append(_row([model, p["psnr_db"], p["cosine_min"], p["max_abs_err"]]))
    return lines


def mel_section(precisions: list[str]) -> list[str]:
    """The mel front-end packages, if the pipeline builds any."""
    if not precisions:
        return []
    header = ["compute", "size (MB)", "target", "backend", "PSNR vs WhisperFeatureExtractor (dB)", "max abs err"]
    header += ["gate (dB)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for precision in precisions:
        m = read_json(mel_metrics_file(precision))
        size_mb = f"{m['size_bytes'] / 1e6:.1f}"
        cells = [precision, size_mb, m["deployment_target"], m["backend"], m["psnr_db"], m["max_abs_err"], m["gate_db"]]
        lines.append(_row(cells))
    return [
        "## Mel front-end (`VoxtralMelSpectrogram.mlpackage`)",
        "",
        "30 s of 16 kHz audio -> `mel_spectrogram [1,128,3000]`, on the speech clip's first 30 s. Its log floor is",
        "per window: for clips over 30 s, VoxtralProcessor's (per clip) can differ.",
        "",
        *lines,
        "",
    ]


def render_report(models: list[str], recipes: list[str], mel_precisions: list[str]) -> str:
    return "\n".join(
        [
            "# Voxtral Core ML encoder packages",
            "",
            "Each package's `audio_embeddings` on one 30 s window of speech, compared with transformers'",
            "`get_audio_features` (fp32) and with the ANE-layout PyTorch module it was converted from.",
            "",
            *package_table(models, recipes),
            "",
            "## ANE module vs transformers (fp32, before conversion)",
            "",
            *parity_table(models),
            "",
            *mel_section(mel_precisions),
        ]
    )
