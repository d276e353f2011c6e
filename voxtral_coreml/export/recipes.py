"""A compression recipe as conf/recipe/ configures it, checked on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voxtral_coreml.pipeline.errors import VoxtralError

from .compress import required_target, validate_params

# Core ML deployment targets and the OS releases that run them.
TARGETS = {"iOS16": ("16.0", "13.0"), "iOS17": ("17.0", "14.0"), "iOS18": ("18.0", "15.0")}


COMMON_RECIPE_KEYS = ("kind", "min_target", "psnr_gate_db")


@dataclass(frozen=True)
class Recipe:
    """A compression recipe as configured in conf/recipe/: the keys every recipe has, and its kind's parameters
    (compress.py's KIND_PARAMS says which; fp16 has none)."""

    name: str
    kind: str
    min_target: str
    psnr_gate_db: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_scan(self) -> bool:
        """Whether it chooses each weight's bits from a sensitivity scan (export/sensitivity.py): `mixed` does."""
        return self.kind == "mixed"

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> Recipe:
        try:
            kind, min_target, gate = (cfg[k] for k in COMMON_RECIPE_KEYS)
        except KeyError as e:
            raise VoxtralError(f"recipe '{name}': missing key {e}") from None
        params = {k: v for k, v in cfg.items() if k not in COMMON_RECIPE_KEYS}
        recipe = cls(name, str(kind), str(min_target), float(gate), params)
        if recipe.min_target not in TARGETS:
            raise VoxtralError(f"recipe '{name}': unknown min_target {recipe.min_target!r}")
        validate_params(name, recipe.kind, params)
        needed, feature = required_target(params)
        if list(TARGETS).index(recipe.min_target) < list(TARGETS).index(needed):
            raise VoxtralError(
                f"recipe '{name}': {feature} needs min_target {needed} (macOS {TARGETS[needed][1]}) "
                f"or later, got {recipe.min_target}"
            )
        return recipe
