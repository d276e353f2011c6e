"""Weights are data, never code: no pickle, no remote code; and a Hub token is never written anywhere.

One reduced pipeline (a gated Hub model served by the local Hub, fp16 only) runs with `HF_TOKEN` set and the
unpickling probe (tests/probes/sitecustomize.py) in every process; then `publish --dry-run` and `encode`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hub_server import FakeRepo

from conftest import DVC, REPO, copy_project, env_with_venv, local_hub, run, write_checkpoint, write_speech

PROBES = Path(__file__).resolve().parent / "probes"
MODEL = "hub-gated"


@dataclass(frozen=True)
class SecuredRun:
    root: Path  # everything the run wrote: project (with .git, .dvc/cache, artifacts), HF cache, outputs
    token: str
    transcripts: list[str]  # stdout and stderr of every command
    unpickled: list[dict]  # what the probe recorded


def _reduce_to_hub_model(project: Path, repo: FakeRepo) -> None:
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    source = {"kind": "hub", "repo_id": repo.repo_id, "revision": repo.commit}
    params["models"][MODEL] = {"variant": "Mini", "license": "apache-2.0", "source": source}
    params["pipeline"].update(models=[MODEL], recipes=["fp16"], mel=[])
    params["pipeline"]["streaming"]["models"] = []
    params["pipeline"]["coreai"].update(models=[MODEL], recipes=["fp16"])  # no coreai process unpickles either
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def secured_run(tmp_path_factory: pytest.TempPathFactory) -> SecuredRun:
    root = tmp_path_factory.mktemp("security")
    token = f"hf_{secrets.token_hex(16)}"
    unpickle_log = root / "unpickled.jsonl"
    with pytest.MonkeyPatch.context() as env, local_hub(root, env) as hub:
        env.setenv("HF_TOKEN", token)
        weights = write_checkpoint(root / "repos" / "gated")
        repo = hub.add_repo(FakeRepo("org/voxtral-gated", weights, gated=True, tokens=frozenset({token})))
        project = copy_project(root / "project")
        _reduce_to_hub_model(project, repo)
        probe_env = {
            "PYTHONPATH": os.pathsep.join([str(PROBES), env_with_venv()["PYTHONPATH"]]),
            "VOXTRAL_PROBE_UNPICKLE_LOG": str(unpickle_log),
        }
        cli = [sys.executable, "-m", "voxtral_coreml.cli"]
        package = project / "artifacts" / "packages" / MODEL / "fp16"
        commands = [
            [DVC, "repro"],
            [*cli, "publish", "--repo", "org/published", "--out", str(root / "published"), "--dry-run"],
            [*cli, "encode", str(write_speech(root / "clip.wav", 3)), "--package", str(package), "--out", "emb.npy"],
        ]
        results = [run(command, project, env=probe_env) for command in commands]
        assert hub.hits() and all(h.authorized for h in hub.hits() if h.server == "hub" and h.filename)
    lines = unpickle_log.read_text().splitlines() if unpickle_log.exists() else []
    transcripts = [text for r in results for text in (r.stdout, r.stderr)]
    return SecuredRun(root, token, transcripts, [json.loads(line) for line in lines])


def test_no_process_unpickles_anything(secured_run: SecuredRun) -> None:
    probed = [Path(e["argv"][0]) for e in secured_run.unpickled if e["what"] == "probed" and e["argv"]]
    stages = {p.stem for p in probed if p.parent.name == "stages"}
    core_ml = {"download", "extract", "build", "sensitivity", "convert", "validate", "report"}
    assert stages == core_ml | {"export", "validate_export"}  # the Core AI export and its validation too
    assert sum(p.name == "cli.py" for p in probed) == 2  # publish and encode
    assert [e for e in secured_run.unpickled if e["what"] != "probed"] == []


def test_the_token_is_in_no_file_and_no_log(secured_run: SecuredRun) -> None:
    assert (secured_run.root / "project" / "dvc.lock").is_file()  # the run did write its outputs
    token = secured_run.token.encode()
    leaked = [p for p in secured_run.root.rglob("*") if p.is_file() and token in p.read_bytes()]
    assert leaked == []
    assert not [t for t in secured_run.transcripts if secured_run.token in t]


# Ways of running code that a file or a server provides: none may appear in the library or the stages.
UNSAFE_LOADING = re.compile(
    r"\bimport pickle\b|\bpickle\.|\btorch\.load\(|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True|"
    r"\bimport dill\b|\bjoblib\.load\(|\bmarshal\.loads?\(|(?<![.\w])(eval|exec)\("
)


def test_the_library_never_loads_code_from_data() -> None:
    sources = sorted([*(REPO / "voxtral_coreml").rglob("*.py"), *(REPO / "stages").glob("*.py")])
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if UNSAFE_LOADING.search(line)
    ]
    assert found == []
