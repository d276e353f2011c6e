"""One thin script per DVC stage: read a slice of params.yaml, call the library, write the outputs.

dvc.yaml runs them with stages/python (the checkout's .venv, whatever the shell's PATH). Started by an interpreter
that lacks this project's dependencies (pyproject.toml's), they stop here with one line, before any output is touched.
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, requires, version


def _missing_dependency() -> str | None:
    try:
        requirements = requires("voxtral-coreml") or []
    except PackageNotFoundError:
        return "voxtral-coreml"
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        try:
            version(name)
        except PackageNotFoundError:
            return name
    return None


if (_missing := _missing_dependency()) is not None:
    sys.stderr.write(
        f"error: {sys.executable} lacks {_missing}, a dependency of this project: run `make install`, then use "
        ".venv/bin/python (or `source .venv/bin/activate`)\n"
    )
    sys.exit(2)

from voxtral_coreml.pipeline.runner import silence_known_warnings  # noqa: E402  (only once the dependencies are known present)

silence_known_warnings()  # before the stage's own imports (coremltools warns on import)
