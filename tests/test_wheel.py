"""`voxtral-coreml` as an installed tool: the wheel carries conf/ (recipes and build settings), and the console
script converts and validates a checkpoint from a folder that is not a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import BUILD, REPO, run, tree_digests, write_checkpoint

# What `pip wheel` reads: the build configuration, the package and the conf/ it carries.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "voxtral_coreml", "conf")


def build_wheel(dest: Path) -> Path:
    """The wheel built from a copy of the sources (the checkout gets no build/ folder), offline."""
    source = dest / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(source)],
        dest,
    )
    [wheel] = dest.glob("voxtral_coreml-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A new venv whose dependencies come from this one's site-packages (a .pth line: offline and quick), with
    nothing of this project in it yet (this venv's editable install is a .pth the new one does not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    [site] = path.glob("lib/python*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    bin_dir = fresh_venv(root / "venv")
    # Nothing of the checkout on the paths (conftest's run() puts it on PYTHONPATH), and --ignore-installed: the
    # dependencies' folder holds this venv's editable install, which pip would otherwise take for this package.
    install = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", "--no-deps"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([*install, "--no-index", "--ignore-installed", str(wheel)], cwd=root, env=env, check=True)
    return bin_dir


def installed_run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A command of the installed venv, with nothing of the checkout on its paths."""
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(cwd), "HF_ENDPOINT": "http://127.0.0.1:9"}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_wheel_carries_conf_as_it_is(installed: Path, tmp_path: Path) -> None:
    code = "import voxtral_coreml.pipeline.conf as c; print(c.conf_dir())"
    result = installed_run(installed, "python", "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    conf = Path(result.stdout.strip())
    assert conf.parent.parent.name == "site-packages" and not conf.is_relative_to(REPO)
    assert tree_digests(conf) == tree_digests(REPO / "conf")


def test_the_installed_cli_converts_and_validates_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    package = tmp_path / "out" / "VoxtralEncoderMini.mlpackage"
    convert = installed_run(
        installed,
        "voxtral-coreml",
        "convert",
        "--checkpoint",
        str(checkpoint),
        "--recipe",
        "int8",
        "--out",
        str(package),
        cwd=tmp_path,
    )
    assert convert.returncode == 0, convert.stderr
    manifest = json.loads((package.parent / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "int8" and {k: manifest[k] for k in BUILD} == BUILD
    validate = installed_run(
        installed, "voxtral-coreml", "validate", str(package), "--checkpoint", str(checkpoint), "--json", cwd=tmp_path
    )
    assert validate.returncode == 0, validate.stderr
    metrics = json.loads(validate.stdout)
    assert metrics["psnr_db"] >= metrics["gate_db"] == 40.0  # conf/recipe/int8.yaml's gate, read from the wheel
