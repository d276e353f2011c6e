"""Fetch only some tensors of a Hub checkpoint: Voxtral's ~1.3 GB audio tower, not the ~48 GB around it.

huggingface_hub's own pieces do the Hub-facing work (revision resolution, token, cache, HTTP session,
error types); the wanted tensors' bytes, and the shard headers that locate them, come from HTTP Range
requests. Ranges being downloaded are kept in `.<out_dir name>.download/` beside `out_dir`, so a dropped
connection or a killed run resumes where it stopped. `out_dir` appears whole or not at all:

    model.safetensors   the wanted tensors: original names, dtypes and bytes, in source order
    config.json ...     those of `extra_files` the repo has
    source.json         repo_id, revision, commit, layout, per-shard ranges, byte counts (no token, no paths)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import try_to_load_from_cache as _cached_file
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers
from tqdm import tqdm

from voxtral_coreml.pipeline.atomic import atomic_path, disk_full_is_an_error, remove_path, write_json_atomic
from voxtral_coreml.pipeline.errors import JSON_ERRORS, VoxtralError

from .ranges import ByteRange, RetryPolicy, download_range, merge_ranges, with_retries
from .safetensors_io import TensorInfo, TensorSpec, encode_header, header_length, parse_header, read_header

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"  # sharded HF layout
SINGLE = "model.safetensors"
CONSOLIDATED = "consolidated.safetensors"  # Mistral's layout, next to params.json
DEFAULT_EXTRA_FILES = ("config.json", "preprocessor_config.json", "params.json")
MERGE_GAP = 1 << 20  # reading 1 MiB costs less than another request's round trip
CHUNK = 8 << 20  # copy buffer: memory stays bounded whatever the shard size
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
DEFAULT_RETRY = RetryPolicy()
LOGIN_HINT = "set HF_TOKEN or run `hf auth login` (formerly `huggingface-cli login`)"


@dataclass(frozen=True)
class _Repo:
    """A repo pinned to one commit, and where the Hub and the local cache are for this call."""

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    cache_dir: Path
    files: frozenset[str]

    def url(self, filename: str) -> str:
        return hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=self.endpoint)

    def label(self, filename: str) -> str:
        return f"{self.repo_id}/{filename}"


@dataclass(frozen=True)
class _Shard:
    name: str
    size: int
    header_bytes: int  # the 8-byte length plus the JSON header
    tensors: list[TensorInfo]  # the wanted ones, by offset
    ranges: list[ByteRange]  # what to read to get them
    local: Path | None  # the complete file in the HF cache, read instead of the network


def fetch_tensors(
    repo_id: str,
    revision: str,
    out_dir: str | os.PathLike[str],
    wanted: Callable[[str], bool],
    *,
    extra_files: tuple[str, ...] = DEFAULT_EXTRA_FILES,
    progress: bool = True,
    merge_gap: int = MERGE_GAP,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> dict[str, Any]:
    """Write the tensors whose names satisfy `wanted` to `out_dir/model.safetensors`; return source.json.

    `HF_ENDPOINT`, `HF_HUB_CACHE`/`HF_HOME` and the token (`HF_TOKEN` or the stored login) are read at call
    time. A shard already complete in the HF cache at the resolved commit is read from disk. In source.json,
    `bytes_fetched` counts the shard bytes read (headers plus merged ranges, from the network or the cache)
    and `tensor_bytes` the bytes of the tensors kept.
    """
    out_dir = Path(out_dir)
    for name in extra_files:
        if Path(name).name != name:
            raise VoxtralError(f"extra file {name!r}: expected a plain file name")
    repo = _resolve(repo_id, revision, retry)
    layout, expected = _find_weights(repo, wanted)
    extras = {name: _download_small(repo, name) for name in extra_files if name in repo.files}
    shards = [_plan_shard(repo, name, names, wanted, merge_gap, retry) for name, names in expected.items()]
    shards = [shard for shard in shards if shard.tensors]
    if not shards:
        raise VoxtralError(f"{repo_id}@{repo.commit}: no tensor matches the wanted names")

    download_dir = out_dir.parent / f".{out_dir.name}.download"
    network_bytes = _download_ranges(repo, shards, download_dir, retry, progress)
    record = _source_record(repo, layout, shards, extras)
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        _write_model(staging / "model.safetensors", shards, download_dir)
        for name, path in extras.items():
            shutil.copyfile(path, staging / name)
        write_json_atomic(staging / "source.json", record)
    remove_path(download_dir)
    count = sum(len(s.tensors) for s in shards)
    logger.info("%s: %d tensors written to %s, %d bytes downloaded", repo_id, count, out_dir, network_bytes)
    return record


def hub_endpoint() -> str:
    # huggingface_hub copies HF_ENDPOINT into its constants at import; read it again for this call.
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    # Same precedence as huggingface_hub's constants, but evaluated now rather than at import.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _resolve(repo_id: str, revision: str, retry: RetryPolicy) -> _Repo:
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint)
    with _hub_errors(repo_id, revision, endpoint):
        info = with_retries(lambda: api.model_info(repo_id, revision=revision, timeout=retry.timeout), retry, repo_id)
    if not info.sha or not COMMIT_HASH.fullmatch(info.sha):
        raise VoxtralError(f"{repo_id}: the Hub at {endpoint} answered no commit for revision {revision!r}")
    if not COMMIT_HASH.fullmatch(revision):
        logger.warning(
            "%s: revision %r is not a commit hash; it resolves to %s today. Pin that hash: a branch or tag "
            "can move, so outputs and caches keyed on it are not stable.",
            repo_id,
            revision,
            info.sha,
        )
    files = frozenset(sibling.rfilename for sibling in info.siblings or [])
    return _Repo(repo_id, revision, info.sha, endpoint, hub_cache_dir(), files)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, endpoint: str, filename: str | None = None) -> Iterator[None]:
    """Turn the client's exceptions into one-line VoxtralErrors naming the repo, revision or file at fault."""
    what = f"{repo_id}/{filename}" if filename else repo_id
    try:
        yield
    except GatedRepoError as e:  # before RepositoryNotFoundError, its base class
        if e.response.status_code == 403:
            raise VoxtralError(
                f"{repo_id} is a gated repo and your token has no access: request it at {endpoint}/{repo_id}"
            ) from e
        raise VoxtralError(f"{repo_id} is a gated repo: accept its terms on the Hub, then {LOGIN_HINT}") from e
    except RepositoryNotFoundError as e:
        raise VoxtralError(f"repo {repo_id} not found at {endpoint} (if private, {LOGIN_HINT})") from e
    except RevisionNotFoundError as e:
        raise VoxtralError(f"{repo_id}: revision {revision!r} not found") from e
    except RemoteEntryNotFoundError as e:
        raise VoxtralError(f"{repo_id}@{revision}: file {filename!r} not found") from e
    except HFValidationError as e:
        raise VoxtralError(f"{what}: {_first_line(e)}") from e
    except HfHubHTTPError as e:
        raise VoxtralError(f"{what}: the Hub answered {_first_line(e)}") from e
    except (httpx2.TransportError, LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise VoxtralError(f"{what}: cannot reach the Hub at {endpoint} ({_first_line(e)})") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _download_small(repo: _Repo, filename: str) -> Path:
    """A whole small file (index, config) through the client, so it lands in (or comes from) the HF cache."""
    with _hub_errors(repo.repo_id, repo.commit, repo.endpoint, filename):
        return Path(
            hf_hub_download(
                repo.repo_id, filename, revision=repo.commit, cache_dir=repo.cache_dir, endpoint=repo.endpoint
            )
        )


def _find_weights(repo: _Repo, wanted: Callable[[str], bool]) -> tuple[str, dict[str, set[str] | None]]:
    """The layout, and each shard to read with the wanted names the index puts there (None: no index)."""
    if INDEX in repo.files:
        weight_map = _read_weight_map(repo, _download_small(repo, INDEX))
        names: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            if wanted(tensor):
                names.setdefault(shard, set()).add(tensor)
        expected: dict[str, set[str] | None] = dict(sorted(names.items()))
        return "sharded", expected
    for layout, name in (("single", SINGLE), ("consolidated", CONSOLIDATED)):
        if name in repo.files:
            return layout, {name: None}
    raise VoxtralError(f"{repo.repo_id}@{repo.commit}: no {INDEX}, {SINGLE} or {CONSOLIDATED} in the repo")


def _read_weight_map(repo: _Repo, path: Path) -> dict[str, str]:
    label = repo.label(INDEX)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (*JSON_ERRORS, KeyError, TypeError) as e:
        raise VoxtralError(f"{label}: not a safetensors index with a weight_map ({_first_line(e)})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise VoxtralError(f"{label}: weight_map is not an object of tensor name -> shard file")
    for shard in set(weight_map.values()):
        _check_shard_name(shard, label)
        if shard not in repo.files:
            raise VoxtralError(f"{label}: names shard {shard!r}, which is not in the repo at {repo.commit}")
    return weight_map


def _check_shard_name(name: str, label: str) -> None:
    # Shard names come from the server: they must stay relative names inside the repo.
    parts = name.split("/")
    relative = not name.startswith("/") and "\\" not in name and not {"", ".", ".."} & set(parts)
    if not relative or not name.endswith(".safetensors"):
        raise VoxtralError(f"{label}: refusing shard name {name!r} (must be a relative *.safetensors path)")


def _plan_shard(
    repo: _Repo,
    name: str,
    expected: set[str] | None,
    wanted: Callable[[str], bool],
    merge_gap: int,
    retry: RetryPolicy,
) -> _Shard:
    """Read a shard's header (cache or network) and pick the wanted tensors and the ranges holding them."""
    cached = _cached_file(repo.repo_id, name, cache_dir=repo.cache_dir, revision=repo.commit)
    local = Path(cached) if isinstance(cached, str) else None
    if local is not None:
        size = local.stat().st_size
        with open(local, "rb") as f:
            header_bytes = 8 + header_length(f.read(8), size, str(local))
        tensors = read_header(local)
    else:
        size, header_bytes, tensors = _remote_header(repo, name, retry)
    if expected is not None and (missing := sorted(expected - tensors.keys())):
        raise VoxtralError(f"{repo.label(INDEX)}: maps '{missing[0]}' to {name}, whose header lacks it")
    selected = sorted(
        (t for t in tensors.values() if wanted(t.name) and (expected is None or t.name in expected)),
        key=lambda t: t.begin,
    )
    ranges = merge_ranges(((t.begin, t.end) for t in selected), merge_gap)
    return _Shard(name, size, header_bytes, selected, ranges, local)


def _remote_header(repo: _Repo, name: str, retry: RetryPolicy) -> tuple[int, int, dict[str, TensorInfo]]:
    label = repo.label(name)
    with _hub_errors(repo.repo_id, repo.commit, repo.endpoint, name):
        meta = with_retries(
            lambda: get_hf_file_metadata(repo.url(name), timeout=retry.timeout, endpoint=repo.endpoint),
            retry,
            label,
        )
        if meta.size is None or (meta.commit_hash and meta.commit_hash != repo.commit):
            raise VoxtralError(f"{label}: the Hub answered size {meta.size} at commit {meta.commit_hash}")
        prefix = _fetch_bytes(repo, name, ByteRange(0, min(8, meta.size)), retry)
        n = header_length(prefix, meta.size, label)
        header = _fetch_bytes(repo, name, ByteRange(8, 8 + n), retry)
    return meta.size, 8 + n, parse_header(header, meta.size - 8 - n, label)


def _fetch_bytes(repo: _Repo, name: str, rng: ByteRange, retry: RetryPolicy) -> bytes:
    # Headers are small (safetensors caps them at 100 MB): held in memory, never written before validation.
    sink = BytesIO()
    download_range(repo.url(name), build_hf_headers(), rng, sink, retry, repo.label(name))
    return sink.getvalue()


def _part_path(download_dir: Path, shard: str, rng: ByteRange) -> Path:
    # The name pins shard and offsets: a part's length on disk is how far that range got.
    return download_dir / f"{quote(shard, safe='')}.{rng.begin}-{rng.end}.part"


def _download_ranges(repo: _Repo, shards: list[_Shard], download_dir: Path, retry: RetryPolicy, progress: bool) -> int:
    """Download every range not read from the cache into its part file; return the bytes received."""
    jobs = [(shard, rng) for shard in shards if shard.local is None for rng in shard.ranges]
    if not jobs:
        return 0
    _claim_download_dir(download_dir, repo)
    parts = [_part_path(download_dir, shard.name, rng) for shard, rng in jobs]
    done = sum(min(p.stat().st_size, rng.size) for p, (_, rng) in zip(parts, jobs, strict=True) if p.exists())
    total = sum(rng.size for _, rng in jobs)
    received = 0

    def on_bytes(n: int) -> None:
        nonlocal received
        received += n
        bar.update(n)

    bar_options = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "disable": not progress}
    with tqdm(total=total, initial=done, desc=repo.repo_id, **bar_options) as bar:
        for (shard, rng), part in zip(jobs, parts, strict=True):
            with (
                _hub_errors(repo.repo_id, repo.commit, repo.endpoint, shard.name),
                disk_full_is_an_error(
                    download_dir, "the bytes received so far are kept there: rerun to resume once there is room"
                ),
            ):
                _download_part(repo, shard.name, rng, part, retry, on_bytes)
    return received


def _claim_download_dir(download_dir: Path, repo: _Repo) -> None:
    """Reuse parts left by an interrupted run of the same repo and commit; discard anything else."""
    owner = {"repo_id": repo.repo_id, "commit": repo.commit}
    marker = download_dir / "owner.json"
    try:
        reusable = json.loads(marker.read_text()) == owner
    except (OSError, ValueError):
        reusable = False
    if not reusable:
        remove_path(download_dir)
        download_dir.mkdir(parents=True)
        write_json_atomic(marker, owner)


def _download_part(
    repo: _Repo, shard: str, rng: ByteRange, part: Path, retry: RetryPolicy, on_bytes: Callable[[int], None]
) -> None:
    if part.exists() and part.stat().st_size > rng.size:
        part.unlink()  # longer than its range: not ours, start over
    with open(part, "ab") as sink:  # append: continue after the bytes already there
        download_range(repo.url(shard), build_hf_headers(), rng, sink, retry, repo.label(shard), on_bytes)
        sink.flush()
        os.fsync(sink.fileno())


def _write_model(path: Path, shards: list[_Shard], download_dir: Path) -> None:
    """Assemble the output tensor by tensor from the part files (or cached shards), then check it."""
    specs = [TensorSpec(t.name, t.torch_dtype, t.shape) for shard in shards for t in shard.tensors]
    header = encode_header(specs)
    with open(path, "wb") as out:
        out.write(header)
        for shard in shards:
            for rng, members in _group_by_range(shard):
                if shard.local:
                    source, base = shard.local, 0
                else:
                    source, base = _part_path(download_dir, shard.name, rng), rng.begin
                with open(source, "rb") as f:
                    for t in members:
                        f.seek(t.begin - base)
                        _copy_exact(f, out, t.nbytes, f"{shard.name}: tensor {t.name!r}")
    written = read_header(path)
    tensor_bytes = sum(spec.nbytes for spec in specs)
    layout = [(i.name, i.torch_dtype, i.shape) for i in written.values()]
    expected = [(s.name, s.dtype, s.shape) for s in specs]
    if layout != expected or path.stat().st_size != len(header) + tensor_bytes:
        raise VoxtralError(f"{path}: assembled file does not match the source headers")


def _group_by_range(shard: _Shard) -> Iterator[tuple[ByteRange, list[TensorInfo]]]:
    # Both lists are sorted by offset and every tensor lies inside one range.
    tensors = iter(shard.tensors)
    pending = next(tensors, None)
    for rng in shard.ranges:
        members = []
        while pending is not None and pending.end <= rng.end:
            members.append(pending)
            pending = next(tensors, None)
        yield rng, members
    for t in [pending, *tensors]:
        if t is not None and t.nbytes:
            raise VoxtralError(f"{shard.name}: tensor {t.name!r} lies outside the fetched ranges")


def _copy_exact(src: BinaryIO, dst: BinaryIO, n: int, what: str) -> None:
    left = n
    while left:
        chunk = src.read(min(left, CHUNK))
        if not chunk:
            raise VoxtralError(f"{what}: {n - left} of {n} bytes on disk, the range is truncated")
        dst.write(chunk)
        left -= len(chunk)


def _source_record(repo: _Repo, layout: str, shards: list[_Shard], extras: dict[str, Path]) -> dict[str, Any]:
    files = {
        shard.name: {
            "size": shard.size,
            "tensors": len(shard.tensors),
            "ranges": [[rng.begin, rng.end] for rng in shard.ranges],
        }
        for shard in shards
    }
    return {
        "kind": "hub",
        "repo_id": repo.repo_id,
        "revision": repo.revision,
        "commit": repo.commit,
        "layout": layout,
        "files": files,
        "extra_files": sorted(extras),
        "bytes_fetched": sum(s.header_bytes + sum(r.size for r in s.ranges) for s in shards),
        "tensor_bytes": sum(t.nbytes for s in shards for t in s.tensors),
    }
