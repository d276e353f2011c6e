"""Interrupted runs, a flaky Hub and full disks: a SIGKILL at any point of a stage, a network fault or a disk
that fills up loses nothing and leaves nothing corrupt.

Kills are real: `dvc repro` (or the stage) runs in its own process group, a probe (tests/probes/sitecustomize.py)
pauses the stage at a chosen point of its work, and the test SIGKILLs the whole group there. The rerun must
complete with the bytes an uninterrupted run gives, leave no staging leftovers, and keep the DVC cache intact.
A full disk is a file size limit (RLIMIT_FSIZE) on the stage's process: writes past it fail with EFBIG as they
would with ENOSPC on a full filesystem, without needing root to mount a small one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hub_server import FakeRepo, HubServer
from safetensors.torch import load_file
from test_hub import FAST, SHARDS, audio_or_projector, cdn_data, data_of, voxtral_like, write_sharded

from conftest import DVC, copy_project, env_with_venv, run, tree_digests
from voxtral_coreml.pipeline import paths
from voxtral_coreml.pipeline.atomic import DISK_FULL, STAGING_PREFIX, write_json_atomic
from voxtral_coreml.pipeline.runner import EXIT_USER_ERROR
from voxtral_coreml.sources import ranges
from voxtral_coreml.sources.hub import fetch_tensors
from voxtral_coreml.sources.ranges import RetryPolicy

PROBES = Path(__file__).resolve().parent / "probes"
MODEL, RECIPE = "demo-mini", "fp16"

# Where each stage is paused to be killed, and what it is doing then.
KILL_POINTS = {
    "download": "voxtral_coreml.sources.download:write_json_atomic",  # checkpoint in staging, no source.json yet
    "extract": "voxtral_coreml.sources.extract:update_weights_hash",  # header written, the first tensor being hashed
    "convert": "voxtral_coreml.export.convert:canonicalize_package",  # package saved into staging, not yet canonical
    "validate": "voxtral_coreml.check.validate:compare_embeddings",  # the package has run, metrics not yet written
}
OUTPUTS = {
    "download": paths.checkpoint_dir(MODEL),
    "extract": paths.extracted_dir(MODEL),
    "convert": paths.package_dir(MODEL, RECIPE),
    "validate": paths.metrics_file(MODEL, RECIPE),
}


def reduce_pipeline(project: Path, edit: Callable[[dict], None] | None = None) -> None:
    """One model, one recipe, no mel stage: what the faults need, nothing more."""
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["pipeline"].update(models=[MODEL], recipes=[RECIPE], mel=[])
    params["pipeline"]["streaming"]["models"] = []
    params["pipeline"]["coreai"]["models"] = []
    if edit is not None:
        edit(params)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def staging_leftovers(project: Path) -> list[Path]:
    return sorted(p.relative_to(project) for p in (project / "artifacts").rglob(f"{STAGING_PREFIX}*"))


def start(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`cmd` in a new process group (so a kill reaches every process of it), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env={**env_with_venv(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path) -> None:
    """Until `condition` holds or the process ends, however long a loaded machine takes: no deadline (a stage that
    never reaches its kill point runs to its end, and that fails the test)."""
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before the kill point:\n{log.read_text()}")
        time.sleep(0.02)


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def kill_when_paused(cmd: list[str], cwd: Path, function: str, files: Path, call: int = 1) -> None:
    """Run `cmd` with the probe pausing it at the `call`th call of `function` (module:function), SIGKILL its
    whole process group there. `files` names the marker and the log (files.paused, files.log)."""
    marker, log = files.with_suffix(".paused"), files.with_suffix(".log")
    probe = {
        "PYTHONPATH": os.pathsep.join([str(PROBES), env_with_venv()["PYTHONPATH"]]),
        "VOXTRAL_PROBE_PAUSE_AT": function,
        "VOXTRAL_PROBE_PAUSE_MARKER": str(marker),
        "VOXTRAL_PROBE_PAUSE_CALL": str(call),
    }
    process = start(cmd, cwd, log, probe)
    wait_for(marker.exists, process, log)
    kill_group(process)


def corrupt_cache_objects(root: Path) -> list[str]:
    """Objects of a DVC cache or local remote whose md5 is not their name (a `.dir` object's name is the md5 of
    its listing); `root` is a repository (its .dvc/cache) or a remote."""
    cache = root / ".dvc" / "cache" if (root / ".dvc").is_dir() else root
    objects = [p for p in (cache / "files" / "md5").rglob("*") if p.is_file()]
    assert objects
    return [
        str(p)
        for p in objects
        if hashlib.md5(p.read_bytes()).hexdigest() != p.parent.name + p.name.removesuffix(".dir")
    ]


# ---------------------------------------------------------------- SIGKILL in each stage of `dvc repro`


@dataclass(frozen=True)
class Kill:
    staging: list[Path]  # staging siblings present when the process group died
    output_present: bool  # the stage's output existed after the kill


@pytest.fixture(scope="module")
def killed_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Kill]]:
    """`dvc repro` killed in download, extract, convert and validate in turn (each rerun continues the last),
    then run to the end."""
    root = tmp_path_factory.mktemp("kills")
    project = copy_project(root / "project")
    reduce_pipeline(project)
    kills = {}
    for stage, function in KILL_POINTS.items():
        kill_when_paused([DVC, "repro"], project, function, root / stage)
        kills[stage] = Kill(staging_leftovers(project), (project / OUTPUTS[stage]).exists())
    run([DVC, "repro"], project)
    return project, kills


@pytest.mark.parametrize("stage", ["download", "extract", "convert"])
def test_a_kill_mid_write_leaves_staging_and_no_output(killed_pipeline, stage: str) -> None:
    _, kills = killed_pipeline
    assert not kills[stage].output_present
    # The kill landed while the output was being written: its staging sibling was there.
    target = OUTPUTS[stage]
    assert [p for p in kills[stage].staging if p.parent == target.parent and p.name.endswith(f"-{target.name}")]


def test_a_kill_mid_validation_leaves_no_metrics(killed_pipeline) -> None:
    _, kills = killed_pipeline
    assert not kills["validate"].output_present
    assert (killed_pipeline[0] / paths.package_dir(MODEL, RECIPE)).is_dir()  # convert's output survived


def test_the_rerun_cleans_every_leftover_and_is_up_to_date(killed_pipeline) -> None:
    project, kills = killed_pipeline
    assert sum(len(k.staging) for k in kills.values()) >= 3  # there was something to clean
    assert staging_leftovers(project) == []
    assert "Data and pipelines are up to date." in run([DVC, "status"], project).stdout
    assert corrupt_cache_objects(project) == []


@pytest.fixture(scope="module")
def uninterrupted_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("uninterrupted") / "project")
    reduce_pipeline(project)
    run([DVC, "repro"], project)
    return project


def test_the_rerun_gives_the_bytes_of_an_uninterrupted_run(killed_pipeline, uninterrupted_project: Path) -> None:
    project, _ = killed_pipeline
    for output in [*OUTPUTS.values(), paths.reference_file(MODEL)]:
        got, expected = project / output, uninterrupted_project / output
        if got.is_dir():
            assert tree_digests(got) == tree_digests(expected), output
        else:
            assert got.read_bytes() == expected.read_bytes(), output


# ---------------------------------------------------------------- SIGKILL mid-range of a Hub download

HUB_MODEL = "hub-tiny"


def hub_project(root: Path, repo: FakeRepo) -> Path:
    project = copy_project(root / "project")

    def use_hub(params: dict) -> None:
        source = {"kind": "hub", "repo_id": repo.repo_id, "revision": repo.commit}
        params["models"][HUB_MODEL] = {"variant": "Mini", "source": source}

    reduce_pipeline(project, use_hub)
    return project


def test_a_download_killed_mid_range_resumes_where_it_stopped(hub: HubServer, tmp_path: Path) -> None:
    tensors = voxtral_like()
    write_sharded(tmp_path / "repos" / "tiny", tensors)
    repo = hub.add_repo(FakeRepo("org/voxtral-tiny", tmp_path / "repos" / "tiny"))
    project = hub_project(tmp_path, repo)
    download_dir = project / "artifacts" / "checkpoints" / f".{HUB_MODEL}.download"
    hub.stall_next(1, seconds=120, after_bytes=3000, match=data_of(SHARDS[1]))  # shard 0's range done by then

    def shard_1_part() -> list[Path]:
        return list(download_dir.glob(f"{SHARDS[1]}.*.part"))

    stage = [sys.executable, "-m", "stages.download", HUB_MODEL]
    process = start(stage, project, tmp_path / "download.log")
    wait_for(
        lambda: bool(shard_1_part()) and shard_1_part()[0].stat().st_size >= 3000, process, tmp_path / "download.log"
    )
    kill_group(process)
    assert not (project / paths.checkpoint_dir(HUB_MODEL)).exists()
    assert shard_1_part()[0].stat().st_size == 3000  # every byte received is on disk, none lost with the process

    hub.clear_faults()
    hub.reset_log()
    run(stage, project)
    out = project / paths.checkpoint_dir(HUB_MODEL)
    assert cdn_data(hub, SHARDS[0]) == []  # the finished range is not sent again
    [resumed] = cdn_data(hub, SHARDS[1])
    [(begin, end)] = json.loads((out / "source.json").read_text())["files"][SHARDS[1]]["ranges"]
    assert resumed.range == (begin + 3000, end - 1)  # from the first byte not received
    got = load_file(out / "model.safetensors")
    expected = {k: v for k, v in tensors.items() if audio_or_projector(k)}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert not download_dir.exists() and staging_leftovers(project) == []


# ---------------------------------------------------------------- the DVC remote

PUSH_KILL_POINT = "dvc_objects.fs.local:copyfile"  # a local remote's upload of one object


def remote_objects(remote: Path) -> list[Path]:
    return sorted(p for p in remote.rglob("*") if p.is_file())


def test_a_push_killed_midway_leaves_nothing_corrupt_and_the_next_push_completes(killed_pipeline) -> None:
    project, _ = killed_pipeline
    remote = project.parent / "remote-killed"
    run([DVC, "remote", "add", "--local", "killed", str(remote)], project)
    # One object at a time, killed as the third starts: two objects are on the remote, the rest not yet.
    kill_when_paused([DVC, "push", "-j", "1", "-r", "killed"], project, PUSH_KILL_POINT, project.parent / "push", 3)
    assert len(remote_objects(remote)) == 2
    assert corrupt_cache_objects(remote) == []
    assert "Cache and remote 'killed' are in sync" not in run([DVC, "status", "-c", "-r", "killed"], project).stdout

    run([DVC, "push", "-r", "killed"], project)
    assert "Cache and remote 'killed' are in sync" in run([DVC, "status", "-c", "-r", "killed"], project).stdout
    assert corrupt_cache_objects(remote) == []
    assert [p for p in remote_objects(remote) if p.suffix == ".tmp"] == []


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """`directory` refuses writes: its mode for a user, a read-only bind mount for root (who ignores modes)."""
    directory.chmod(0o555)
    mounted = os.geteuid() == 0
    if mounted:
        subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
    try:
        with pytest.raises(OSError):  # the test means nothing if the directory still takes writes
            (directory / "probe").touch()
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True)
        directory.chmod(0o755)


def test_a_push_to_a_remote_that_refuses_writes_fails_and_changes_nothing(killed_pipeline) -> None:
    project, _ = killed_pipeline
    remote = project.parent / "remote-read-only"
    remote.mkdir()
    run([DVC, "remote", "add", "--local", "read-only", str(remote)], project)
    with read_only(remote):
        result = run([DVC, "push", "-r", "read-only"], project, check=False)
    assert result.returncode != 0
    assert f"Read-only file system: '{remote}" in result.stderr or f"Permission denied: '{remote}" in result.stderr
    assert remote_objects(remote) == []
    assert corrupt_cache_objects(project) == []
    assert "Data and pipelines are up to date." in run([DVC, "status"], project).stdout


# ---------------------------------------------------------------- a flaky Hub


def test_a_flaky_hub_is_retried_with_backoff_resumed_and_verified(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = voxtral_like()
    write_sharded(tmp_path / "repos" / "tiny", tensors)
    repo = hub.add_repo(FakeRepo("org/voxtral-tiny", tmp_path / "repos" / "tiny"))
    clean = fetch_tensors(repo.repo_id, repo.commit, tmp_path / "clean", audio_or_projector, progress=False, retry=FAST)
    hub.reset_log()

    waits: list[float] = []
    monkeypatch.setattr(ranges, "time", SimpleNamespace(sleep=waits.append))  # record the backoff, skip the wait
    hub.fail_next(3, 503, match=data_of(SHARDS[0]))  # a Hub answering 5xx a few times
    hub.drop_next(1, after_bytes=2000, match=data_of(SHARDS[1]))  # a connection dropped mid-range
    hub.stall_next(1, seconds=3, after_bytes=1000, match=data_of(SHARDS[2]))  # a transfer that stalls mid-range
    policy = RetryPolicy(attempts=4, base_wait=0.1, max_wait=0.3, timeout=0.5)
    record = fetch_tensors(
        repo.repo_id, repo.commit, tmp_path / "out", audio_or_projector, progress=False, retry=policy
    )

    # Backoff doubles up to its cap; a retry that received data restarts from the first wait.
    assert waits == [0.1, 0.2, 0.3, 0.1, 0.1]
    assert [h.status for h in cdn_data(hub, SHARDS[0])] == [503, 503, 503, 206]
    for shard, received in ((SHARDS[1], 2000), (SHARDS[2], 1000)):
        [(begin, end)] = record["files"][shard]["ranges"]
        first, resumed = cdn_data(hub, shard)
        assert first.range == (begin, end - 1) and resumed.range == (begin + received, end - 1), shard
    assert record == clean
    assert sha256(tmp_path / "out" / "model.safetensors") == sha256(tmp_path / "clean" / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert {k: tensor_sha256(v) for k, v in got.items()} == {
        k: tensor_sha256(v) for k, v in tensors.items() if audio_or_projector(k)
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- full disk

# Starts `cmd` with RLIMIT_FSIZE set: no file it writes may grow past the limit (Python ignores SIGXFSZ, so
# the write fails with EFBIG instead of killing the process). A launcher rather than preexec_fn, which is
# unsafe while the test's Hub server threads run.
LIMITED = "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
LIMITED += "os.execv(sys.argv[2], sys.argv[2:])"


def run_on_full_disk(cmd: list[str], cwd: Path, max_file_bytes: int) -> subprocess.CompletedProcess[str]:
    """`cmd` as if the disk filled up once any file it writes reaches `max_file_bytes`."""
    return run([sys.executable, "-c", LIMITED, str(max_file_bytes), *cmd], cwd, check=False)


def assert_one_line_naming(result: subprocess.CompletedProcess[str], output: Path, reason: str) -> None:
    """The stage failed as for a user's mistake: one line naming `output` and why, no traceback."""
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {output}: {reason}"), last


FILE_TOO_LARGE = f"{DISK_FULL[errno.EFBIG]} ("


def artifacts_files(project: Path) -> set[Path]:
    return {p.relative_to(project) for p in (project / "artifacts").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def extracted_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("disk") / "project")
    reduce_pipeline(project)
    for stage in ("download", "extract"):
        run([sys.executable, "-m", f"stages.{stage}", MODEL], project)
    return project


def test_extract_on_a_full_disk_names_its_output_and_leaves_nothing(extracted_project: Path) -> None:
    output = paths.extracted_dir(MODEL)
    (extracted_project / output).rename(extracted_project / f"{output}.aside")
    try:
        before = artifacts_files(extracted_project)
        # Under the 345 kB encoder.safetensors, above every other file the stage writes.
        result = run_on_full_disk([sys.executable, "-m", "stages.extract", MODEL], extracted_project, 200_000)
        assert_one_line_naming(result, output, FILE_TOO_LARGE)
        assert result.stderr.strip().endswith("; nothing was written")
        assert not (extracted_project / output).exists()
        assert artifacts_files(extracted_project) == before  # no partial output, no staging leftover
    finally:
        (extracted_project / f"{output}.aside").rename(extracted_project / output)


def test_convert_on_a_full_disk_names_its_output_and_leaves_nothing(extracted_project: Path) -> None:
    run([sys.executable, "-m", "stages.sensitivity", MODEL, RECIPE], extracted_project)
    before = artifacts_files(extracted_project)
    # Under the 536 kB weight.bin, above every other file the stage writes.
    result = run_on_full_disk([sys.executable, "-m", "stages.convert", MODEL, RECIPE], extracted_project, 300_000)
    # coremltools' own writer fails first, in the temporary package it converts into: it gives no errno.
    package = paths.package_dir(MODEL, RECIPE) / "VoxtralEncoderMini.mlpackage"
    assert_one_line_naming(result, package, "coremltools could not write the weights into ")
    assert result.stderr.strip().endswith("; nothing was written")
    assert not (extracted_project / paths.package_dir(MODEL, RECIPE)).exists()
    assert artifacts_files(extracted_project) == before


def test_a_hub_download_on_a_full_disk_keeps_what_it_received_for_the_rerun(hub: HubServer, tmp_path: Path) -> None:
    write_sharded(tmp_path / "repos" / "tiny", voxtral_like())
    project = hub_project(tmp_path, hub.add_repo(FakeRepo("org/voxtral-tiny", tmp_path / "repos" / "tiny")))
    stage = [sys.executable, "-m", "stages.download", HUB_MODEL]
    download_dir = paths.checkpoint_dir(HUB_MODEL).parent / f".{HUB_MODEL}.download"
    limit = 20_000  # under shard 1's range

    result = run_on_full_disk(stage, project, limit)
    assert_one_line_naming(result, download_dir, FILE_TOO_LARGE)
    assert result.stderr.strip().endswith(
        "the bytes received so far are kept there: rerun to resume once there is room"
    )
    assert not (project / paths.checkpoint_dir(HUB_MODEL)).exists()
    [part] = (project / download_dir).glob(f"{SHARDS[0]}.*.part")
    assert part.stat().st_size == limit
    assert staging_leftovers(project) == []

    hub.reset_log()
    run(stage, project)  # room again: the rerun continues after the bytes kept
    [(begin, end)] = json.loads((project / paths.checkpoint_dir(HUB_MODEL) / "source.json").read_text())["files"][
        SHARDS[0]
    ]["ranges"]
    [resumed] = cdn_data(hub, SHARDS[0])
    assert resumed.range == (begin + limit, end - 1)
    assert not (project / download_dir).exists()


def test_staging_of_a_killed_writer_not_yet_reaped_is_stale(tmp_path: Path) -> None:
    """A writer SIGKILLed with its parent lingers as a zombie until init reaps it: its staging is stale."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    target = tmp_path / "out.json"
    staging = tmp_path / f"{STAGING_PREFIX}{writer.pid}-0123abcd-{target.name}"
    staging.write_text("half")
    writer.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{writer.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":  # not waited for yet
        assert time.monotonic() < deadline
        time.sleep(0.01)
    write_json_atomic(target, {"ok": True})
    writer.wait()
    assert not staging.exists() and json.loads(target.read_text()) == {"ok": True}
