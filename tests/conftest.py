"""Shared fixtures: tiny synthetic checkpoints in the real layout, and a demo pipeline run in a scratch repo."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from hub_server import HubServer
from huggingface_hub import constants
from worker_groups import (  # noqa: F401  (pytest hooks: how `make test` splits the suite over two workers)
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_unconfigure,
    pytest_xdist_make_scheduler,
)

from voxtral_coreml.encoders.dims import EncoderDims
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.features.logmel import SAMPLE_RATE, builtin_speech_clip, load_audio
from voxtral_coreml.pipeline.conf import build_settings
from voxtral_coreml.sources.extract import extract_audio_tower
from voxtral_coreml.sources.synthetic import LanguageModelShape, write_synthetic_checkpoint

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
DEMO_DIMS = EncoderDims(d_model=64, n_layers=2, n_heads=4, ffn_dim=256, hidden_size=96)
DEMO_LM = LanguageModelShape(layers=2, intermediate=256, vocab=1000, shards=3)
# conf/conversion.yaml's build settings: what the pipeline and the CLI convert with.
BUILD = {key: build_settings()[key] for key in ("attention", "query_chunk")}
RECIPE_CONFIGS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((REPO / "conf" / "recipe").glob("*.yaml"))}
TINY_CALIBRATION = {"clips": 1, "seconds": 2, "first": 100, "device": "cpu"}  # one window: cheap, still real speech
DEMO_PROMOTE_SHARE = 0.1  # 2% of a demo model's parameters is less than one of its 64 x 64 weights


def demo_recipe(name: str, **overrides: object) -> Recipe:
    """conf/recipe/<name>.yaml for demo dimensions: a data-aware recipe calibrates on TINY_CALIBRATION and promotes
    DEMO_PROMOTE_SHARE, unless `overrides` say otherwise."""
    cfg = {**RECIPE_CONFIGS[name], **overrides}
    if "calibration" in cfg and "calibration" not in overrides:
        cfg["calibration"] = TINY_CALIBRATION
    if cfg.get("promote") and "promote" not in overrides:
        cfg["promote"] = {**cfg["promote"], "share": DEMO_PROMOTE_SHARE}
    return Recipe.from_config(name, cfg)


# No test can reach the real Hub: unless a test points the client at tests/hub_server.py (the `hub` fixture), it
# gets a refused connection (the discard port on this machine), in this process and in every subprocess.
UNREACHABLE_HUB = "http://127.0.0.1:9"
os.environ["HF_ENDPOINT"] = UNREACHABLE_HUB
constants.ENDPOINT = UNREACHABLE_HUB
constants.HUGGINGFACE_CO_URL_TEMPLATE = UNREACHABLE_HUB + "/{repo_id}/resolve/{revision}/{filename}"
# What a scratch copy of the project needs to run its pipeline.
PROJECT_FILES = ("conf", "stages", "voxtral_coreml", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config",
                 ".dvcignore", ".gitignore")  # fmt: skip


def env_with_venv() -> dict[str, str]:
    """DVC stages call `python`: make it this interpreter. The package comes from this checkout, not from
    wherever the venv's editable install points (a scratch repo's own copy still wins: `python -m` puts the
    working directory first)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": pythonpath,
        "DVC_NO_ANALYTICS": "1",
    }


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`cmd` with this checkout's interpreter and package (plus `env`), its output captured."""
    result = subprocess.run(cmd, cwd=cwd, env={**env_with_venv(), **(env or {})}, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # `python -m`, not the venv's console script: that one imports wherever the editable install points.
    return run([sys.executable, "-m", "voxtral_coreml.cli", *args], cwd=cwd, check=False)


@functools.cache
def _builtin_speech() -> np.ndarray:
    return load_audio(builtin_speech_clip())


def speech(seconds: float) -> np.ndarray:
    """Real speech of any length at 16 kHz: the built-in 27 s clip, repeated as often as needed."""
    clip, n = _builtin_speech(), round(seconds * SAMPLE_RATE)
    return np.tile(clip, -(-n // len(clip)))[:n].copy()


def write_speech(path: Path, seconds: float) -> Path:
    """`speech(seconds)` as a float wav, so that reading it back gives the same samples."""
    soundfile.write(path, speech(seconds), SAMPLE_RATE, subtype="FLOAT")
    return path


def write_checkpoint(root: Path, dims: EncoderDims = DEMO_DIMS, seed: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_synthetic_checkpoint(root, dims, DEMO_LM, seed=seed)
    return root


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "checkpoint")


@pytest.fixture(scope="session")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extracted")
    out = root / "extracted"
    extract_audio_tower(write_checkpoint(root / "checkpoint"), out)
    return out


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running local Hub, the client pointed at it, and an HF home/cache/token store under tmp_path."""
    with local_hub(tmp_path, monkeypatch) as server:
        yield server


@contextlib.contextmanager
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The `hub` fixture's Hub and environment, for fixtures of any scope."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    # The client fixes these paths at import: point them at tmp_path too, so neither the user's cache nor
    # their stored login can be touched (fetch_tensors itself reads HF_HUB_CACHE/HF_HOME at call time).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    # Environment variables reach subprocesses (dvc stages) as well.
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def copy_project(dest: Path) -> Path:
    """A scratch git + DVC repository holding this project's pipeline definition."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    run(["git", "init", "-q"], dest)
    commit_all(dest, "init")
    return dest


def commit_all(repo: Path, message: str) -> None:
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", message], repo)


def clone(repo: Path, dest: Path) -> Path:
    """A fresh clone: what git carries (dvc.lock included), no artifacts, no DVC cache."""
    run(["git", "clone", "-q", str(repo), str(dest)], repo.parent)
    return dest


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo pipeline, run once per test session in a scratch copy of the project, dvc.lock committed."""
    repo = copy_project(tmp_path_factory.mktemp("demo") / "repo")
    run([DVC, "repro"], repo)
    commit_all(repo, "dvc repro")  # as a user would, so that clones carry dvc.lock
    return repo


def output_digests(repo: Path) -> dict[str, str]:
    """tree_digests of a repo's DVC outputs: artifacts/ less timings/, which is machine-dependent and untracked."""
    return {k: v for k, v in tree_digests(repo / "artifacts").items() if not k.startswith("timings/")}
