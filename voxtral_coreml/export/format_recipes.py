"""Which recipe kinds each export format can build (formats.py), as plain data: the composition of the
configuration (params.py) refuses a recipe without an equivalent before any stage runs, and imports nothing heavy."""

from __future__ import annotations

from typing import Any

from voxtral_coreml.pipeline.errors import VoxtralError

# format -> the recipe kinds it has an equivalent of (None: every kind) and why the others have none.
RECIPE_KINDS: dict[str, tuple[str, ...] | None] = {"coreml": None, "coreai": ("fp16", "linear", "palettize")}
# format -> (its name in messages, why a kind outside RECIPE_KINDS has no equivalent); `mixed`: a width per weight
REFUSAL = {"coreai": ("Core AI", "coreai-opt compresses every weight the same way")}


def check_recipe_kind(fmt: str, name: str, kind: str) -> None:
    kinds = RECIPE_KINDS[fmt]
    if kinds is not None and kind not in kinds:
        title, why = REFUSAL[fmt]
        raise VoxtralError(
            f"recipe '{name}': kind {kind} has no {title} equivalent ({why}); {title} takes recipes of kind "
            f"{', '.join(kinds)}"
        )


def check_pipeline(params: dict[str, Any]) -> None:
    """What the pipeline builds in another format (`pipeline.<format>.models` x `.recipes`) exists and has an
    equivalent there: refused when the configuration is composed, not when its stage runs."""
    pipeline = params.get("pipeline") or {}
    for fmt in RECIPE_KINDS:
        section = pipeline.get(fmt) or {}
        for model in section.get("models") or []:
            if model not in (pipeline.get("models") or []):
                raise VoxtralError(f"pipeline.{fmt}.models: {model!r} is not in pipeline.models (not extracted)")
        for name in section.get("recipes") or []:
            config = (params.get("recipes") or {}).get(name)
            if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
                raise VoxtralError(f"pipeline.{fmt}.recipes: unknown recipe {name!r}")
            check_recipe_kind(fmt, name, config["kind"])
