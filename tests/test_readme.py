"""Every shell command of README.md's ```bash blocks runs as written, in order, in a fresh shell without the venv
activated, in a fresh clone: the newcomer's path. Commands marked in the README as needing the network (or running
this very suite) are the only ones left out.

Cheap by reuse: the clone's `.venv` is this venv (a symlink; its stamp newer than the clone's requirements), and
its DVC cache is the session's demo run's, with that run's dvc.lock, so `make demo` checks the outputs out rather
than building them again."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import GIT, REPO, UNREACHABLE_HUB, commit_all, run

NOT_OFFLINE = ("needs the network", "runs the test suite")  # how the README marks what this test cannot run
VENV = Path(sys.executable).parent.parent


def readme_commands(readme: Path, language: str = "bash") -> list[str]:
    """The lines of the ```bash (or other `language`) blocks, in order (comment lines dropped, continuations
    joined)."""
    commands: list[str] = []
    in_block = False
    for line in readme.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = stripped == f"```{language}"
        elif in_block and stripped and not stripped.startswith("#"):
            if commands and commands[-1].endswith("\\"):
                commands[-1] = f"{commands[-1][:-1]} {stripped}"
            else:
                commands.append(stripped)
    return commands


def marked(command: str) -> bool:
    comment = command.partition("  #")[2]
    return any(mark in comment for mark in NOT_OFFLINE)


def fresh_clone(dest: Path, demo_repo: Path) -> Path:
    """The checkout's files (committed or not, less what git ignores) as a new repository, set up as above."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    shutil.copy2(demo_repo / "dvc.lock", dest / "dvc.lock")
    (dest / ".venv").symlink_to(VENV)
    stamp = (VENV / ".installed").stat().st_mtime
    for prerequisite in ("requirements.lock", "pyproject.toml"):  # `make` must not reinstall into this venv
        os.utime(dest / prerequisite, (stamp - 1, stamp - 1))
    run(["git", "init", "-q"], dest)
    commit_all(dest, "clone")
    run([str(VENV / "bin" / "dvc"), "cache", "dir", "--local", str(demo_repo / ".dvc" / "cache")], dest)
    return dest


def fresh_shell_env(home: Path) -> dict[str, str]:
    """A login's environment: the venv neither activated nor on PATH, a home of its own, no real Hub."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != VENV / "bin")
    keep = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return {**keep, "PATH": path, "HOME": str(home), "HF_ENDPOINT": UNREACHABLE_HUB, "DVC_NO_ANALYTICS": "1"}


def test_the_readme_lists_commands_and_marks_the_ones_that_need_the_network() -> None:
    commands = readme_commands(REPO / "README.md")
    assert commands[0].startswith("make demo")
    assert any(c.startswith("make publish") and marked(c) for c in commands)
    assert sum(not marked(c) for c in commands) >= 15


def test_the_readmes_python_imports_exist() -> None:
    """The ```python blocks import what the package has (a layout change once left them naming old modules)."""
    imports = [line for line in readme_commands(REPO / "README.md", "python") if line.startswith("from voxtral_coreml")]
    assert imports
    for line in imports:
        exec(line, {})  # the README's own import lines


def test_the_readmes_paths_exist() -> None:
    """Every repository path the README names in backticks is there (a path may wrap after a slash)."""
    text = (REPO / "README.md").read_text().replace("/\n", "/")
    paths = set(re.findall(r"`((?:voxtral_coreml|stages|conf|benchmarks|tests|\.ci)/[\w./-]*)`", text))
    assert len(paths) > 10
    assert [p for p in sorted(paths) if not (REPO / p).exists()] == []


def test_every_offline_readme_command_runs_as_written(tmp_path: Path, demo_repo: Path) -> None:
    clone = fresh_clone(tmp_path / "voxtral-coreml", demo_repo)
    env = fresh_shell_env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    ran = []
    for command in readme_commands(clone / "README.md"):
        if marked(command):
            continue
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "-c", command], cwd=clone, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
        output = (result.stdout + result.stderr).lower()  # `dvc exp run --run-all` exits 0 when experiments fail
        assert "failed to reproduce" not in output, f"{command}\n{result.stderr[-3000:]}"
        ran.append(command)
    status = run([*GIT, "status", "--porcelain", "--untracked-files=no"], clone).stdout
    assert re.fullmatch(r"( M (params\.yaml|dvc\.lock)\n)*", status), status  # only what `dvc exp run -S` changes
    assert len(ran) >= 15
