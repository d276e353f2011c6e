"""`voxtral-coreml` as a user runs it: real subprocesses, one-line errors, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from layout_writers import MLXQuant, write_mlx_checkpoint

from conftest import DEMO_DIMS, DEMO_LM, cli
from voxtral_coreml.extract import extract_audio_tower


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import write_checkpoint

    root = tmp_path_factory.mktemp("cli")
    checkpoint = write_checkpoint(root / "checkpoint")
    package = root / "out" / "VoxtralEncoderMini.mlpackage"
    result = cli("convert", "--checkpoint", str(checkpoint), "--recipe", "fp16", "--variant", "Mini",
                 "--out", str(package))  # fmt: skip
    assert result.returncode == 0, result.stderr
    return checkpoint, package


def test_convert_writes_package_and_manifest_beside_it(converted: tuple[Path, Path]) -> None:
    _, package = converted
    manifest = json.loads((package.parent / "manifest.json").read_text())
    assert manifest["package"] == package.name and package.is_dir()
    assert manifest["outputs"][0]["shape"] == [1, 375, 96]
    assert sorted(p.name for p in package.parent.iterdir()) == ["VoxtralEncoderMini.mlpackage", "manifest.json"]


def test_validate_prints_metrics_as_json(converted: tuple[Path, Path]) -> None:
    checkpoint, package = converted
    result = cli("validate", str(package), "--checkpoint", str(checkpoint), "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["psnr_db"] >= metrics["gate_db"]
    assert {"cosine_min", "max_abs_err", "backend", "size_bytes"} <= set(metrics)


def test_inspect_describes_the_package(converted: tuple[Path, Path]) -> None:
    _, package = converted
    info = json.loads(cli("inspect", str(package), "--json").stdout)
    assert info["structure"]["outputs"][0] == {"name": "audio_embeddings", "shape": [1, 375, 96], "dtype": "float32"}
    assert info["structure"]["ops"]["einsum"] > 0


def test_convert_takes_an_mlx_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "mlx-8bit"
    write_mlx_checkpoint(checkpoint, DEMO_DIMS, DEMO_LM, quant=MLXQuant(bits=8, group_size=32))
    package = tmp_path / "out" / "VoxtralEncoderMini.mlpackage"
    result = cli("convert", "--checkpoint", str(checkpoint), "--variant", "Mini", "--out", str(package))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((package.parent / "manifest.json").read_text())
    assert manifest["outputs"][0]["shape"] == [1, 375, DEMO_DIMS.hidden_size]
    # The package holds the dequantized weights: the same ones extraction reads from the MLX checkpoint.
    assert manifest["weights_sha256"] == extract_audio_tower(checkpoint, tmp_path / "extracted")["weights_sha256"]


def test_variant_is_inferred_only_from_known_widths(tmp_path: Path, converted: tuple[Path, Path]) -> None:
    checkpoint, _ = converted
    result = cli("convert", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.mlpackage"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot tell Mini from Small for projector width 96; pass --variant Mini|Small"
    )
    assert not (tmp_path / "x.mlpackage").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "--checkpoint", "/no/such/dir", "--out", "x.mlpackage"], "/no/such/dir: checkpoint directory"),
        (["convert", "--checkpoint", ".", "--recipe", "int3", "--out", "x.mlpackage"], "unknown recipe 'int3'"),
        (["inspect", "/no/such.mlpackage"], "/no/manifest.json: not found"),
    ],
)  # fmt: skip
def test_errors_are_one_line_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
