"""Outputs appear whole or not at all: write into a hidden sibling, then rename over the target.

A process killed mid-write (SIGKILL, power loss) leaves its staging sibling behind; the next write of the same
target removes it, so leftovers never pile up nor pass for an output. A full disk is reported as one line
naming the output, with nothing of it left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import VoxtralError

STAGING_PREFIX = ".partial-"
# .partial-<pid>-<8 hex>-<target name>: the pid tells whether the writer may still be running.
_STAGING_NAME = re.compile(r"\.partial-(\d+)-[0-9a-f]{8}-(.+)")
# What a write into a full filesystem (or past a quota or RLIMIT_FSIZE) fails with.
DISK_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
}
_active: set[Path] = set()  # staging paths this process is writing now


def _staging_path(target: Path) -> Path:
    # A hidden sibling on the same filesystem, so the final rename is atomic; the name keeps the target's
    # suffix because some writers insist on it (coremltools wants ".mlpackage").
    return target.parent / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"


def shown_path(path: str | os.PathLike[str]) -> Path:
    """`path` with staging names replaced by their targets' names: what a message should name."""
    parts = [m.group(2) if (m := _STAGING_NAME.fullmatch(part)) else part for part in Path(path).parts]
    return Path(*parts)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Killed, and not yet reaped: a stage killed with its `dvc repro` waits for init, which may take its time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS), or gone meanwhile: kill(pid, 0) has the last word
        return False
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # the state follows "(comm)", which may hold spaces


def remove_stale_staging(target: Path) -> None:
    """Remove staging siblings of `target` whose writer is gone (killed before it could clean up)."""
    if not target.parent.is_dir():
        return
    for sibling in target.parent.glob(f"{STAGING_PREFIX}*"):
        match = _STAGING_NAME.fullmatch(sibling.name)
        if match is None or match.group(2) != target.name or sibling in _active:
            continue
        pid = int(match.group(1))
        # Our own pid on a staging we do not hold: a dead run's pid, reused (containers start from low pids).
        if pid == os.getpid() or not _process_alive(pid):
            remove_path(sibling)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def disk_full_is_an_error(path: str | os.PathLike[str], consequence: str = "nothing was written") -> Iterator[None]:
    """Turn a write failing for want of space into one line naming `path` (as the user knows it)."""
    try:
        yield
    except OSError as e:
        code = _disk_full_errno(e)
        if code is None:
            raise
        raise VoxtralError(f"{shown_path(path)}: {DISK_FULL[code]} ({os.strerror(code)}); {consequence}") from e


def _disk_full_errno(error: BaseException) -> int | None:
    """The DISK_FULL errno behind `error` or its causes; shutil.copytree (coremltools' save) reports as text."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            return cause.errno
        if isinstance(cause, shutil.Error) and cause.args and isinstance(cause.args[0], list):
            for *_, why in cause.args[0]:  # (src, dst, "[Errno 28] No space left on device: ...")
                code = next((c for c in DISK_FULL if str(why).startswith(f"[Errno {c}]")), None)
                if code is not None:
                    return code
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging path (file or directory) that replaces `target` only if the block succeeds."""
    target = Path(target)
    with disk_full_is_an_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = _staging_path(target)
    _active.add(staging)
    try:
        with disk_full_is_an_error(target):
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
        _active.discard(staging)
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
