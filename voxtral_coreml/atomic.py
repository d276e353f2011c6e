"""Outputs appear whole or not at all: write into a hidden sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _staging_path(target: Path) -> Path:
    # A hidden sibling on the same filesystem, so the final rename is atomic; the name keeps the target's
    # suffix because some writers insist on it (coremltools wants ".mlpackage").
    return target.parent / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging path (file or directory) that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(target)
    try:
        yield staging
        if not staging.exists():
            raise RuntimeError(f"nothing was written to {staging} for {target}")
        old = None
        if target.exists() or target.is_symlink():
            old = _staging_path(target)
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            remove_path(old)
    finally:
        if staging.exists() or staging.is_symlink():
            remove_path(staging)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as staging, open(staging, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(target, text.encode())


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Hold `target`'s lock file (a hidden sibling) against every other process, whichever machine shares the disk."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # lockf: POSIX record locks, which NFS forwards (flock may stay local)
        try:
            yield
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


def build_once(target: str | os.PathLike[str], build: Callable[[Path], None]) -> bool:
    """Make `target` (file or directory) with `build(staging)` unless it exists; True if this call made it.

    Since `target` appears whole (atomic_path), existing means complete. Processes that want the same target at
    once wait on its lock, and all but the first then find it made."""
    target = Path(target)
    if target.exists():
        return False
    with exclusive_lock(target):
        if target.exists():
            return False
        with atomic_path(target) as staging:
            build(staging)
    return True
