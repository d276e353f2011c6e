"""dvc push / pull of every artifact and of the run cache: the default local remote, and S3 (a moto server).

One demo run serves every test: it is pushed once per remote, then each test works in a fresh clone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DVC, GIT, clone, output_digests, run

LOCAL_REMOTE = Path(".cache") / "voxtral-coreml" / "dvc-remote"  # .dvc/config: ~/<this>, for any clone location
BUCKET = "voxtral-coreml"
S3_URL = f"s3://{BUCKET}/dvc"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API on 127.0.0.1 (random port), fake credentials in the environment DVC's subprocesses get."""
    import boto3
    from moto.server import ThreadedMotoServer

    aws = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(aws / "config"))  # never the user's profiles
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws / "credentials"))
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home of its own for DVC's subprocesses: the default remote (under ~) is never the user's."""
    with pytest.MonkeyPatch.context() as env:
        path = tmp_path_factory.mktemp("home")
        env.setenv("HOME", str(path))
        yield path


@dataclass(frozen=True)
class Remote:
    name: str
    configure: Callable[[Path], None]  # points a checkout at this remote (a no-op for the default one)


def push(demo_repo: Path, remote: Remote) -> Remote:
    remote.configure(demo_repo)
    run([DVC, "push", "--run-cache", "-r", remote.name], demo_repo)
    return remote


@pytest.fixture(scope="module")
def local_remote(demo_repo: Path) -> Remote:
    return push(demo_repo, Remote("local", lambda repo: None))


@pytest.fixture(scope="module")
def s3_remote(demo_repo: Path, s3_endpoint: str) -> Iterator[Remote]:
    def configure(repo: Path) -> None:
        # --local: .dvc/config.local, for per-machine settings (a team commits the url, see README.md)
        run([DVC, "remote", "add", "--local", "-f", "s3", S3_URL], repo)
        run([DVC, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint], repo)

    yield push(demo_repo, Remote("s3", configure))
    run([DVC, "remote", "remove", "--local", "s3"], demo_repo)


@pytest.fixture(params=["local", "s3"])
def remote(request: pytest.FixtureRequest) -> Remote:
    return request.getfixturevalue(f"{request.param}_remote")


def fresh_clone(demo_repo: Path, tmp_path: Path, remote: Remote) -> Path:
    # Anywhere: not beside demo_repo (the default remote does not depend on where a clone lives).
    repo = clone(demo_repo, tmp_path / "somewhere" / "else" / "clone")
    remote.configure(repo)
    run([DVC, "remote", "default", "--local", remote.name], repo)  # what `dvc pull` and `repro --pull` use
    return repo


def test_the_default_remote_is_a_directory_in_the_users_cache(demo_repo: Path, home: Path) -> None:
    assert run([DVC, "remote", "default"], demo_repo).stdout.strip() == "local"
    listed = run([DVC, "remote", "list"], demo_repo).stdout.split()
    assert Path(listed[listed.index("local") + 1]).expanduser() == home / LOCAL_REMOTE  # never inside a checkout


def test_pull_in_a_fresh_clone_restores_every_artifact(demo_repo: Path, remote: Remote, tmp_path: Path) -> None:
    repo = fresh_clone(demo_repo, tmp_path, remote)
    run([DVC, "pull"], repo)
    assert output_digests(repo) == output_digests(demo_repo)  # packages, metrics, report
    assert "Data and pipelines are up to date." in run([DVC, "status"], repo).stdout


# `dvc repro --pull` rewrites dvc.lock per stage (80 s for the demo's 82 stages): on the default remote only. Which
# remote it pulls from is `dvc pull`'s part, run above against both.
def test_repro_pull_in_a_fresh_clone_runs_nothing(demo_repo: Path, local_remote: Remote, tmp_path: Path) -> None:
    repo = fresh_clone(demo_repo, tmp_path, local_remote)
    result = run([DVC, "repro", "--pull"], repo)
    assert "Running stage" not in result.stdout
    assert output_digests(repo) == output_digests(demo_repo)
    run([*GIT, "diff", "--exit-code"], repo)


def test_the_pushed_run_cache_rebuilds_dvc_lock_without_running(
    demo_repo: Path, local_remote: Remote, tmp_path: Path
) -> None:
    """A checkout without dvc.lock (say, a branch that never ran the pipeline) gets every stage from the run cache."""
    repo = fresh_clone(demo_repo, tmp_path, local_remote)
    (repo / "dvc.lock").unlink()
    result = run([DVC, "repro", "--pull"], repo)
    assert "Running stage" not in result.stdout
    assert "Stage 'convert@demo-mini-fp16' is cached - skipping run" in result.stdout
    run([*GIT, "diff", "--exit-code", "dvc.lock"], repo)  # the same lock file, rebuilt


def test_s3_holds_the_objects_and_the_run_cache(s3_endpoint: str, s3_remote: Remote) -> None:
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.startswith("dvc/files/md5/") for k in keys) and any(k.startswith("dvc/runs/") for k in keys)
