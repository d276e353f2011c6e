"""A local stand-in for the Hugging Face Hub's HTTP API: the real huggingface_hub client, tested offline.

It speaks what the client uses to resolve revisions and download files (checked against huggingface_hub
2.4.0's hf_api.py, file_download.py and utils/_http.py):

- `GET /api/models/{repo_id}[/revision/{rev}]`: model info JSON with `sha` and `siblings`.
- `HEAD|GET /{repo_id}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag`; small files are served directly
  (200, or 206 + `Content-Range` for a `Range`); `*.safetensors` behave like LFS/Xet files: a 302 whose
  `Location` points at a second "CDN" origin (another port) with `X-Linked-Size`/`X-Linked-Etag`, so the
  client reads metadata off the redirect and httpx2 drops the token when following it.
- Errors the way the Hub signals them, in `X-Error-Code`/`X-Error-Message` and a JSON body:
  `RepoNotFound` (401 without a token, 404 with one), `RevisionNotFound` (404), `EntryNotFound` (404, with
  `X-Repo-Commit`), `GatedRepo` (401 without a token, 403 with a token not granted access). As on the Hub,
  a gated repo's model info is public; only its files are gated.

And what `HfApi.create_repo` and `HfApi.upload_folder` use to publish, over the plain LFS protocol (the
client's Xet path needs a CAS server; tests set HF_HUB_DISABLE_XET, which the client honours):

- `POST /api/repos/create`: a repo whose first commit holds the Hub's default `.gitattributes`; 409 if
  it exists (the client's `exist_ok`).
- `POST /api/validate-yaml`: the README's front matter must be YAML (400 with `errors` otherwise).
- `GET /api/models/{repo_id}/tree/{rev}[/{path}]`: the listing (`recursive`) that `delete_patterns` and
  `snapshot_download` read, with `lfs` info for LFS files.
- `POST /api/models/{repo_id}/preupload/{rev}`: `uploadMode` per file ("lfs" for a `.gitattributes`
  pattern, a binary sample or > 10 MiB) and the remote `oid`, so unchanged files are skipped.
- `POST /{repo_id}.git/info/lfs/objects/batch`: an upload action on the CDN origin (like a signed storage
  URL: the client sends no token there) and a verify action, or none if the object is stored already;
  `PUT` to the CDN stores the object after checking its sha256; `POST .../objects/verify` checks it.
- `POST /api/models/{repo_id}/commit/{rev}`: the NDJSON commit (`header`, `file`, `lfsFile`,
  `deletedFile`, `deletedFolder`); it checks `parentCommit` and that LFS objects exist, applies the
  operations to the repo's tree and answers `commitOid`/`commitUrl`. A pushed repo then serves downloads
  like the others (LFS files through the CDN redirect).

Writes need a token in `write_tokens` (401 otherwise). Tests inspect `log` (one `Hit` per request),
`bytes_sent(repo_id)` and `commits`, and inject faults: answer an error status, drop the connection after
K body bytes, or stall T seconds before the body (or after its first K bytes).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml


@dataclass
class FakeRepo:
    """A model repo whose single commit is the content of `root`."""

    repo_id: str
    root: Path
    commit: str = field(default_factory=lambda: secrets.token_hex(20))
    branches: tuple[str, ...] = ("main",)
    gated: bool = False
    tokens: frozenset[str] = frozenset()  # tokens granted access to a gated repo
    hidden: frozenset[str] = frozenset()  # listed in siblings but missing on download (a broken repo)
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256 of the files committed as LFS

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def resolve(self, revision: str) -> str | None:
        return self.commit if revision in (*self.branches, self.commit) else None


@dataclass
class Hit:
    """One request as the server saw it."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    repo_id: str | None = None
    filename: str | None = None
    range: tuple[int, int] | None = None  # as asked: [first, last] byte, inclusive
    authorized: bool = False  # an Authorization header was present
    status: int = 0
    bytes_sent: int = 0  # body bytes only
    bytes_received: int = 0  # request body bytes


@dataclass
class Fault:
    kind: str  # "status" | "drop" | "stall"
    count: int  # requests left to hit
    match: Callable[[Hit], bool]
    status: int = 503
    after_bytes: int = 0
    seconds: float = 0.0


def ranged(hit: Hit) -> bool:
    """Default fault target: GETs with a Range header (what the fetcher sends for headers and tensors)."""
    return hit.method == "GET" and hit.range is not None


@dataclass
class Commit:
    """One commit the server accepted."""

    repo_id: str
    oid: str
    summary: str
    description: str
    operations: list[tuple[str, str]]  # (key, path): ("file"|"lfsFile"|"deletedFile"|"deletedFolder", path)


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes | tuple[Path, int, int] = b""  # bytes, or (file, first, end) served from disk

    @property
    def length(self) -> int:
        return len(self.body) if isinstance(self.body, bytes) else self.body[2] - self.body[1]


class HubServer:
    """Hub + CDN on 127.0.0.1 (random free ports), each a ThreadingHTTPServer in a thread."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[Hit] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._etags: dict[tuple[Path, int, int], str] = {}
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self.write_tokens: set[str] = set()
        self.commits: list[Commit] = []
        self.errors: list[Exception] = []  # exceptions raised while answering (bugs of this server)
        self._storage: Path | None = None  # pushed repos and LFS objects, removed by stop()

    # lifecycle
    def start(self) -> HubServer:
        self._storage = Path(tempfile.mkdtemp(prefix="hub-server-"))
        for role in ("hub", "cdn"):
            server = _Server(self, role)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers[role] = server
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        if self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return self._url("hub")

    def _url(self, role: str) -> str:
        return f"http://127.0.0.1:{self._servers[role].server_address[1]}"

    # setup and inspection
    def add_repo(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def bytes_sent(self, repo_id: str) -> int:
        with self._lock:
            return sum(h.bytes_sent for h in self.log if h.repo_id == repo_id)

    def hits(self, filename: str | None = None, method: str | None = None) -> list[Hit]:
        with self._lock:
            return [
                h
                for h in self.log
                if (filename is None or h.filename == filename) and (method is None or h.method == method)
            ]

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    # fault injection
    def fail_next(self, n: int, status: int = 503, match: Callable[[Hit], bool] = ranged) -> None:
        self._add_fault(Fault("status", n, match, status=status))

    def drop_next(self, n: int, after_bytes: int, match: Callable[[Hit], bool] = ranged) -> None:
        self._add_fault(Fault("drop", n, match, after_bytes=after_bytes))

    def stall_next(self, n: int, seconds: float, match: Callable[[Hit], bool] = ranged, after_bytes: int = 0) -> None:
        self._add_fault(Fault("stall", n, match, seconds=seconds, after_bytes=after_bytes))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def _take_fault(self, hit: Hit, serves_file: bool) -> Fault | None:
        """The first matching fault, in the order added; drops and stalls need a file body to act on."""
        with self._lock:
            for fault in self.faults:
                applies = fault.kind == "status" or serves_file
                if fault.count > 0 and applies and fault.match(hit):
                    fault.count -= 1
                    return fault
        return None

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.log.append(hit)

    # routing
    def answer(self, hit: Hit, range_header: str | None, authorization: str | None, body: bytes = b"") -> _Answer:
        url = urlsplit(hit.path)
        path = url.path
        if hit.server == "cdn":
            return self._lfs_store(hit, path, body) if hit.method == "PUT" else self._cdn(hit, path, range_header)
        if hit.method == "POST":
            return self._post(hit, path, body, authorization)
        if path.startswith("/api/models/") and "/tree/" in path:
            return self._tree(hit, path.removeprefix("/api/models/"), parse_qs(url.query))
        if path.startswith("/api/models/"):
            return self._model_info(hit, path.removeprefix("/api/models/"), authorization)
        if "/resolve/" in path:
            repo_part, rest = path.split("/resolve/", 1)
            revision, _, filename = rest.partition("/")
            hit.repo_id, hit.filename = unquote(repo_part.lstrip("/")), unquote(filename)
            return self._resolve(hit, unquote(revision), range_header, authorization)
        return _error(404, None, "Not Found")

    def _model_info(self, hit: Hit, rest: str, authorization: str | None) -> _Answer:
        repo_part, _, revision = rest.partition("/revision/")
        hit.repo_id = unquote(repo_part)
        repo = self.repos.get(hit.repo_id)
        if repo is None:
            return _repo_not_found(authorization)
        commit = repo.resolve(unquote(revision) if revision else "main")
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit,
            "lastModified": "2025-07-15T00:00:00.000Z",
            "private": False,
            "gated": "manual" if repo.gated else False,  # the Hub shows gated repos' info to anyone
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": [{"rfilename": name} for name in repo.files()],
        }
        return _Answer(200, {"Content-Type": "application/json"}, json.dumps(info).encode())

    def _resolve(self, hit: Hit, revision: str, range_header: str | None, authorization: str | None) -> _Answer:
        repo = self.repos.get(hit.repo_id or "")
        if repo is None:
            return _repo_not_found(authorization)
        if repo.gated and (denied := _gate(repo, authorization)) is not None:
            return denied
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        file = repo.root / (hit.filename or "")
        if hit.filename not in repo.files() or hit.filename in repo.hidden:
            return _error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        size = file.stat().st_size
        if file.suffix == ".safetensors" or hit.filename in repo.lfs:  # LFS/Xet: metadata here, bytes on the CDN
            etag = f'"{self._sha256(file)}"'
            signed = f"{quote(hit.filename or '')}?sig={secrets.token_hex(8)}"  # like a signed URL
            cdn = f"{self._url('cdn')}/{repo.repo_id}/{commit}/{signed}"
            headers |= {"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(size), "Location": cdn}
            return _Answer(302, headers)
        headers["ETag"] = f'"{_git_blob_sha(file)}"'
        return _serve_file(file, range_header, headers)

    def _cdn(self, hit: Hit, path: str, range_header: str | None) -> _Answer:
        # /{org}/{name}/{commit}/{file}: only reachable through a Hub redirect (like a signed URL).
        parts = path.lstrip("/").split("/", 3)
        if len(parts) < 4:
            return _Answer(404, {}, b"no such object")
        hit.repo_id, hit.filename = f"{parts[0]}/{parts[1]}", unquote(parts[3])
        repo = self.repos.get(hit.repo_id)
        if repo is None or repo.commit != parts[2] or hit.filename not in repo.files():
            return _Answer(404, {}, b"no such object")
        return _serve_file(
            repo.root / hit.filename, range_header, {"ETag": f'"{self._sha256(repo.root / hit.filename)}"'}
        )

    def _sha256(self, file: Path) -> str:
        stat = file.stat()
        key = (file, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._etags:
                self._etags[key] = hashlib.sha256(file.read_bytes()).hexdigest()
            return self._etags[key]

    # publishing
    def _post(self, hit: Hit, path: str, body: bytes, authorization: str | None) -> _Answer:
        if path == "/api/validate-yaml":
            return _validate_yaml(json.loads(body))
        if (denied := self._writer(authorization)) is not None:
            return denied
        if path == "/api/repos/create":
            return self._create_repo(hit, json.loads(body))
        if path.endswith(".git/info/lfs/objects/batch"):
            hit.repo_id = path.lstrip("/").removesuffix(".git/info/lfs/objects/batch")
            return self._lfs_batch(hit, json.loads(body))
        if path.endswith(".git/info/lfs/objects/verify"):
            return self._lfs_verify(json.loads(body))
        repo_id, action, revision = _api_parts(path)
        hit.repo_id = repo_id
        repo = self.repos.get(repo_id or "")
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        if repo.resolve(revision) is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if action == "preupload":
            return self._preupload(repo, json.loads(body))
        if action == "commit":
            return self._commit(repo, [json.loads(line) for line in body.splitlines() if line.strip()])
        return _error(404, None, "Not Found")

    def _writer(self, authorization: str | None) -> _Answer | None:
        token = (authorization or "").removeprefix("Bearer ").strip()
        if token not in self.write_tokens:
            return _error(401, None, "Invalid username or password.")
        return None

    def _create_repo(self, hit: Hit, payload: dict) -> _Answer:
        hit.repo_id = f"{payload.get('organization')}/{payload['name']}"
        url = f"{self.endpoint}/{hit.repo_id}"
        with self._lock:
            if hit.repo_id in self.repos:
                return _json(409, {"error": "You already created this model repo", "url": url})
            root = self._storage / "repos" / hit.repo_id
            root.mkdir(parents=True)
            (root / ".gitattributes").write_text(DEFAULT_GITATTRIBUTES)
            self.repos[hit.repo_id] = FakeRepo(hit.repo_id, root)
        return _Answer(
            200, {"Content-Type": "application/json"}, json.dumps({"url": url, "name": hit.repo_id}).encode()
        )

    def _preupload(self, repo: FakeRepo, payload: dict) -> _Answer:
        attributes = (repo.root / ".gitattributes").read_text() if (repo.root / ".gitattributes").is_file() else ""
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = _lfs_pattern(f["path"], attributes) or b"\0" in sample or f["size"] > LFS_THRESHOLD
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": self._remote_oid(repo, f["path"])})  # fmt: skip
        return _json(200, {"files": files})

    def _remote_oid(self, repo: FakeRepo, path: str) -> str | None:
        # What the client compares with its local oid: sha256 for LFS files, the git blob sha otherwise.
        file = repo.root / path
        if not file.is_file():
            return None
        return repo.lfs[path] if path in repo.lfs else _git_blob_sha(file)

    def _lfs_path(self, oid: str) -> Path:
        return self._storage / "lfs" / oid

    def _lfs_batch(self, hit: Hit, payload: dict) -> _Answer:
        objects = []
        for obj in payload["objects"]:
            stored = self._lfs_path(obj["oid"])
            if stored.is_file() and stored.stat().st_size == obj["size"]:
                objects.append({"oid": obj["oid"], "size": obj["size"]})  # already there: no actions
                continue
            upload = f"{self._url('cdn')}/lfs/{obj['oid']}?sig={secrets.token_hex(8)}"
            verify = f"{self.endpoint}/{hit.repo_id}.git/info/lfs/objects/verify"
            actions = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": actions})
        return _json(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")

    def _lfs_store(self, hit: Hit, path: str, body: bytes) -> _Answer:
        oid = path.removeprefix("/lfs/")
        hit.filename = oid
        if hashlib.sha256(body).hexdigest() != oid:
            return _Answer(400, {}, b"sha256 mismatch")
        self._lfs_path(oid).parent.mkdir(parents=True, exist_ok=True)
        self._lfs_path(oid).write_bytes(body)
        return _Answer(200, {"ETag": f'"{oid}"'})

    def _lfs_verify(self, payload: dict) -> _Answer:
        stored = self._lfs_path(payload["oid"])
        if not stored.is_file() or stored.stat().st_size != payload["size"]:
            return _error(404, None, f"Object {payload['oid']} not found")
        return _json(200, {"success": True})

    def _commit(self, repo: FakeRepo, lines: list[dict]) -> _Answer:
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        operations = [(line["key"], line["value"]) for line in lines if line["key"] != "header"]
        with self._lock:
            if header.get("parentCommit") not in (None, repo.commit):
                return _error(412, None, "A commit has happened since. Please refresh and try again.")
            for key, value in operations:
                target = repo.root / value["path"]
                if key == "lfsFile" and not self._lfs_path(value["oid"]).is_file():
                    return _error(400, None, f"LFS pointer {value['path']} points to an object that does not exist")
                if key == "deletedFile" and not target.is_file():
                    return _error(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
            for key, value in operations:
                _apply(repo, key, value, self._lfs_path(value["oid"]) if key == "lfsFile" else None)
            parent = repo.commit
            repo.commit = hashlib.sha1(f"{parent}\n{json.dumps(lines)}".encode()).hexdigest()
            summary, description = header.get("summary", ""), header.get("description", "")
            ops = [(key, value["path"]) for key, value in operations]
            self.commits.append(Commit(repo.repo_id, repo.commit, summary, description, ops))
        url = f"{self.endpoint}/{repo.repo_id}/commit/{repo.commit}"
        return _json(200, {"success": True, "commitOid": repo.commit, "commitUrl": url, "hookOutput": ""})

    def _tree(self, hit: Hit, rest: str, query: dict[str, list[str]]) -> _Answer:
        repo_id, tail = _split_repo(rest)
        hit.repo_id = repo_id
        revision, _, prefix = tail.removeprefix("tree/").partition("/")
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        if repo.resolve(unquote(revision)) is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        base = repo.root / unquote(prefix)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        paths = sorted(base.rglob("*") if recursive else base.iterdir())
        return _json(200, [_tree_entry(repo, p) for p in paths])


def _git_blob_sha(file: Path) -> str:
    data = file.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# The patterns a new model repo's .gitattributes starts with on the Hub (the ones that matter here).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in ("*.bin", "*.mlmodel", "*.safetensors")
)
LFS_THRESHOLD = 10 * 1024 * 1024


def _json(status: int, obj: object, content_type: str = "application/json") -> _Answer:
    return _Answer(status, {"Content-Type": content_type}, json.dumps(obj).encode())


def _split_repo(rest: str) -> tuple[str, str]:
    """`org/name/tail...` -> (repo_id, tail)."""
    org, _, remainder = rest.partition("/")
    name, _, tail = remainder.partition("/")
    return f"{org}/{name}", tail


def _api_parts(path: str) -> tuple[str | None, str, str]:
    """/api/models/{org}/{name}/{action}/{revision} -> (repo_id, action, revision)."""
    if not path.startswith("/api/models/"):
        return None, "", ""
    repo_id, tail = _split_repo(path.removeprefix("/api/models/"))
    action, _, revision = tail.partition("/")
    return repo_id, action, unquote(revision)


def _lfs_pattern(path: str, gitattributes: str) -> bool:
    patterns = [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line]
    return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in patterns)


def _validate_yaml(payload: dict) -> _Answer:
    content = payload.get("content", "")
    front = content.split("---", 2)[1] if content.startswith("---") and content.count("---") >= 2 else ""
    try:
        metadata = yaml.safe_load(front) or {}
    except yaml.YAMLError as e:
        return _json(400, {"errors": [{"message": f"Invalid YAML in README.md: {e}"}], "warnings": []})
    if not isinstance(metadata, dict):
        return _json(400, {"errors": [{"message": "The README's metadata must be a mapping"}], "warnings": []})
    return _json(200, {"errors": [], "warnings": []})


def _apply(repo: FakeRepo, key: str, value: dict, lfs_object: Path | None) -> None:
    target = repo.root / value["path"]
    if key in ("file", "lfsFile"):
        target.parent.mkdir(parents=True, exist_ok=True)
        if lfs_object is not None:
            shutil.copyfile(lfs_object, target)
            repo.lfs[value["path"]] = value["oid"]
        else:
            target.write_bytes(base64.b64decode(value["content"]))
            repo.lfs.pop(value["path"], None)
        return
    if key == "deletedFolder":
        shutil.rmtree(target, ignore_errors=True)
        repo.lfs = {p: oid for p, oid in repo.lfs.items() if not p.startswith(value["path"].rstrip("/") + "/")}
    else:
        target.unlink()
        repo.lfs.pop(value["path"], None)
    for folder in target.parents:  # git has no empty folders
        if folder == repo.root or not folder.is_dir() or any(folder.iterdir()):
            break
        folder.rmdir()


def _tree_entry(repo: FakeRepo, path: Path) -> dict[str, object]:
    name = path.relative_to(repo.root).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": 0, "path": name}
    entry: dict[str, object] = {"type": "file", "oid": _git_blob_sha(path), "size": path.stat().st_size, "path": name}
    if name in repo.lfs:
        entry["lfs"] = {"oid": repo.lfs[name], "size": path.stat().st_size, "pointerSize": 134}
    return entry


def _gate(repo: FakeRepo, authorization: str | None) -> _Answer | None:
    token = (authorization or "").removeprefix("Bearer ").strip()
    if not token:
        message = (
            f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
            "to access it. Please log in."
        )
        return _error(401, "GatedRepo", message)
    if token not in repo.tokens:
        message = f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
        return _error(403, "GatedRepo", message)
    return None


def _repo_not_found(authorization: str | None) -> _Answer:
    # Without a token the Hub answers 401, not 404, so private repos cannot be told from missing ones.
    return _error(401 if authorization is None else 404, "RepoNotFound", "Repository not found")


def _error(status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> _Answer:
    headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
    if code is not None:
        headers["X-Error-Code"] = code
    return _Answer(status, headers, json.dumps({"error": message}).encode())


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """[first, last] for a single-range header, None without one, "bad" if unsatisfiable."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.groups() == ("", ""):
        return "bad"
    first, last = match.groups()
    if first == "":
        start, stop = max(size - int(last), 0), size - 1  # suffix range: the last N bytes
    else:
        start, stop = int(first), min(int(last), size - 1) if last else size - 1
    return "bad" if start > stop or start >= size else (start, stop)


def _serve_file(file: Path, range_header: str | None, headers: dict[str, str]) -> _Answer:
    size = file.stat().st_size
    rng = _parse_range(range_header, size)
    if rng == "bad":
        return _Answer(416, {"Content-Range": f"bytes */{size}"})
    if rng is None:
        return _Answer(200, headers, (file, 0, size))
    start, stop = rng  # type: ignore[misc]
    return _Answer(206, headers | {"Content-Range": f"bytes {start}-{stop}/{size}"}, (file, start, stop + 1))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stalled handler must not hold up stop()

    def __init__(self, hub: HubServer, role: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.role = hub, role

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up (timeouts, dropped connections) are part of the tests


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_POST(self) -> None:
        self._handle(send_body=True)

    def do_PUT(self) -> None:
        self._handle(send_body=True)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed uploads
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, send_body: bool) -> None:
        hub = self.server.hub
        hit = Hit(self.server.role, self.command, self.path)
        hit.authorized = self.headers.get("Authorization") is not None
        match = _RANGE.fullmatch((self.headers.get("Range") or "").strip())
        if match and match.group(1):
            hit.range = (int(match.group(1)), int(match.group(2)) if match.group(2) else -1)
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        hit.bytes_received = len(body)
        try:
            answer = hub.answer(hit, self.headers.get("Range"), self.headers.get("Authorization"), body)
        except Exception as e:  # a bug here, not a client error: answer it, keep it for the test to show
            hub.errors.append(e)
            answer = _error(500, None, f"server bug: {type(e).__name__}: {e}")
        fault = hub._take_fault(hit, serves_file=not isinstance(answer.body, bytes))
        if fault is not None and fault.kind == "status":
            answer = _error(fault.status, None, "injected fault")
        hit.status = answer.status
        hub._record(hit)  # now, not after the body: a stalled request is visible while it stalls
        try:
            self._send(answer, send_body, fault, hit)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout) while we stalled

    def _send(self, answer: _Answer, send_body: bool, fault: Fault | None, hit: Hit) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("X-Request-Id", secrets.token_hex(8))
        self.send_header("Content-Length", str(answer.length))
        self.end_headers()
        if not send_body:
            return
        limit = answer.length
        if fault is not None and fault.kind == "stall":  # `after_bytes` of the body, then silence
            self._write_body(answer, 0, min(limit, fault.after_bytes), hit)
            time.sleep(fault.seconds)
            self._write_body(answer, min(limit, fault.after_bytes), limit, hit)
            return
        if fault is not None and fault.kind == "drop":
            limit = min(limit, fault.after_bytes)
        self._write_body(answer, 0, limit, hit)
        if limit < answer.length:  # hang up mid-body: the client sees a short read
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _write_body(self, answer: _Answer, begin: int, end: int, hit: Hit) -> None:
        for chunk in _body_chunks(answer, begin, end):
            self.wfile.write(chunk)
            hit.bytes_sent += len(chunk)
        self.wfile.flush()


def _body_chunks(answer: _Answer, begin: int, end: int, chunk: int = 1 << 16):
    """The body's bytes [begin, end)."""
    if isinstance(answer.body, bytes):
        yield answer.body[begin:end]
        return
    file, start, _ = answer.body
    with open(file, "rb") as f:
        f.seek(start + begin)
        left = end - begin
        while left > 0 and (data := f.read(min(chunk, left))):
            yield data
            left -= len(data)
