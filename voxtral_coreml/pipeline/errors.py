"""One exception type for everything a user can get wrong; the CLI and stages print it as one line."""

from __future__ import annotations

import json
from pathlib import Path


class VoxtralError(Exception):
    """A bad input or environment problem, with a message that names the file, key or value at fault."""


# What json.loads raises on bytes from anywhere: bad UTF-8 or syntax and numbers past Python's limits are
# ValueErrors, deep nesting a RecursionError. Every reader of untrusted JSON catches these (and its own lookups').
JSON_ERRORS = (ValueError, RecursionError)


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_json(path: Path) -> dict:
    """A JSON object from a file that may come from anywhere: every failure is a one-line VoxtralError."""
    if not path.is_file():
        raise VoxtralError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except JSON_ERRORS as e:
        raise VoxtralError(f"{path}: invalid JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise VoxtralError(f"{path}: expected a JSON object")
    return data
