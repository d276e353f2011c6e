"""params.yaml: the composed form of conf/, read by the stages one slice at a time.

conf/ is the single source of truth. `dvc exp run -S ...` composes it through DVC's Hydra integration;
`make params` (this module's main) composes it the same way, with DVC's own function, for plain `dvc repro`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from .errors import VoxtralError

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path("conf")
CONFIG_NAME = "config"


def compose_params(
    out_file: str | os.PathLike[str] = PARAMS_FILE,
    conf_dir: str | os.PathLike[str] = CONF_DIR,
    overrides: list[str] | None = None,
) -> None:
    """Compose conf/ into `out_file` exactly as `dvc exp run -S` does."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from voxtral_coreml.export.format_recipes import check_pipeline

    from .atomic import atomic_path

    conf_dir = Path(conf_dir).resolve()
    with atomic_path(Path(out_file)) as staging:  # the composition, checked, or nothing
        try:
            compose_and_dump(staging, str(conf_dir), None, CONFIG_NAME, str(conf_dir.parent), overrides or [])
        except (HydraException, OmegaConfBaseException) as e:
            raise VoxtralError(f"{conf_dir}: {str(e).splitlines()[0]}") from None
        check_pipeline(load_params(staging))


def load_params(path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise VoxtralError(f"{path}: not found (run `make params` to compose it from conf/)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VoxtralError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(params, dict):
        raise VoxtralError(f"{path}: expected a mapping at the top level")
    return params


def lookup(params: dict[str, Any], dotted: str) -> Any:
    """The value at `a.b.c`, or an error naming the first missing key and what exists beside it."""
    node: Any = params
    walked: list[str] = []
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "nothing"
            where = ".".join(walked) or "the top level"
            raise VoxtralError(f"{PARAMS_FILE}: no '{key}' under {where} (known: {known})")
        node = node[key]
        walked.append(key)
    return node


def main() -> None:
    from .runner import run

    run(lambda: compose_params(overrides=sys.argv[1:]))


if __name__ == "__main__":
    main()
