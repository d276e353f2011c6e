"""conf/ as the library's own entry points read it: the recipes and the build settings the pipeline uses.

One source of truth: in a checkout this is the repository's conf/ (which params.yaml is composed from); a wheel
carries a copy of the same conf/ as package data (setup.py's build step), so an installed `voxtral-coreml`
converts exactly as the pipeline does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import VoxtralError

PACKAGED_CONF = Path(__file__).resolve().parents[1] / "conf"  # in a wheel
CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"  # in a checkout (an editable install)
CONVERSION_FILE = "conversion.yaml"  # how every package is built: build.attention, build.query_chunk, ...


def conf_dir() -> Path:
    """The packaged copy first: beside a site-packages directory, a `conf/` could be anyone's."""
    for candidate in (PACKAGED_CONF, CHECKOUT_CONF):
        if (candidate / CONVERSION_FILE).is_file():
            return candidate
    raise VoxtralError(f"{PACKAGED_CONF}: not found, nor {CHECKOUT_CONF}: this installation has no recipes")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise VoxtralError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise VoxtralError(f"{path}: expected a mapping at the top level")
    return data


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "recipe").glob("*.yaml"))


def recipe_config(name: str) -> dict[str, Any]:
    path = conf_dir() / "recipe" / f"{name}.yaml"
    if not path.is_file():
        raise VoxtralError(f"unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    return read_yaml(path)


def build_settings() -> dict[str, Any]:
    """conf/conversion.yaml's `build`: the attention core and query chunk the pipeline converts with."""
    path = conf_dir() / CONVERSION_FILE
    build = read_yaml(path).get("build")
    if not isinstance(build, dict) or not {"attention", "query_chunk"} <= set(build):
        raise VoxtralError(f"{path}: 'build' needs 'attention' and 'query_chunk'")
    return build


def format_settings(name: str) -> dict[str, Any]:
    """conf/conversion.yaml's `<format>:` section: an export format's own conversion options (formats.py)."""
    path = conf_dir() / CONVERSION_FILE
    settings = read_yaml(path).get(name)
    if not isinstance(settings, dict):
        raise VoxtralError(f"{path}: '{name}' must be a mapping of the {name} format's options")
    return settings
