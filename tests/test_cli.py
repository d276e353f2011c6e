"""`voxtral-coreml` as a user runs it: real subprocesses, one-line errors, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from layout_writers import MLXQuant, write_mlx_checkpoint

from conftest import BUILD, DEMO_DIMS, DEMO_LM, cli, write_checkpoint
from voxtral_coreml import __version__
from voxtral_coreml.encoders.dims import EncoderDims
from voxtral_coreml.sources.extract import extract_audio_tower

DEMO_SMALL_DIMS = EncoderDims(d_model=64, n_layers=3, n_heads=4, ffn_dim=256, hidden_size=160)  # conf/model/demo-small


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    checkpoint = write_checkpoint(root / "checkpoint")
    package = root / "out" / "VoxtralEncoderMini.mlpackage"
    # No --variant: the demo's projector width (96) is neither Mini's nor Small's, and --out names the package.
    result = cli("convert", "--checkpoint", str(checkpoint), "--recipe", "fp16", "--out", str(package))
    assert result.returncode == 0, result.stderr
    return checkpoint, package


def test_convert_writes_package_and_manifest_beside_it(converted: tuple[Path, Path]) -> None:
    _, package = converted
    manifest = json.loads((package.parent / "manifest.json").read_text())
    assert manifest["package"] == package.name and package.is_dir()
    assert manifest["outputs"][0]["shape"] == [1, 375, 96]
    assert manifest["variant"] == "Mini"  # from --out's name
    assert {k: manifest[k] for k in BUILD} == BUILD  # conf/conversion.yaml's defaults, recorded
    assert sorted(p.name for p in package.parent.iterdir()) == ["VoxtralEncoderMini.mlpackage", "manifest.json"]


def test_a_detected_2507_checkpoint_is_refused_streaming(converted: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, _ = converted  # --family auto: the family is known once the checkpoint is read
    result = cli("convert", "--checkpoint", str(checkpoint), "--streaming", "stateful", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{checkpoint}: --streaming: the 2507 encoders are bidirectional" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_calibrates_a_data_aware_recipe(converted: tuple[Path, Path], tmp_path: Path) -> None:
    """pal6s compresses the module in PyTorch first (k-means with per-channel scales, no data): the CLI runs that
    step itself, as the pipeline's sensitivity stage does."""
    checkpoint, _ = converted
    package = tmp_path / "VoxtralEncoderMini.mlpackage"
    result = cli("convert", "--checkpoint", str(checkpoint), "--recipe", "pal6s", "--out", str(package))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "pal6s" and set(manifest["compression"]["bits_per_op"].values()) == {6}
    assert manifest["ane"]["ops"].get("constexpr_lut_to_dense", 0) > 0


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


def test_variant_comes_from_the_flag_a_known_width_or_the_package_name(
    tmp_path: Path, converted: tuple[Path, Path]
) -> None:
    checkpoint, _ = converted
    result = cli("convert", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.mlpackage"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot tell Mini from Small for projector width 96; pass --variant Mini|Small "
        "or name the output VoxtralEncoderMini.mlpackage or VoxtralEncoderSmall.mlpackage (or .aimodel)"
    )
    assert not (tmp_path / "x.mlpackage").exists()


def test_an_existing_out_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "VoxtralEncoderMini.mlpackage"
    out.mkdir()
    # The checkpoint does not exist either: the output is checked first, so that is not what is reported.
    result = cli("convert", "--checkpoint", "/no/such/dir", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {out}: already exists; remove it or choose another --out"]
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []


def test_validate_against_another_models_checkpoint_is_one_line(tmp_path: Path, converted: tuple[Path, Path]) -> None:
    _, package = converted
    small = write_checkpoint(tmp_path / "demo-small", DEMO_SMALL_DIMS, seed=2)
    result = cli("validate", str(package), "--checkpoint", str(small))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {package}: converted from an encoder of projector width 96, 2 layers, d_model 64; {small} holds "
        "width 160, 3 layers, d_model 64: validate against the checkpoint it was converted from"
    )
    assert "Traceback" not in result.stderr


def test_publish_outside_the_repository_is_one_line(tmp_path: Path) -> None:
    result = cli("publish", "--repo", "org/name", "--out", str(tmp_path / "card"), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: not the pipeline's repository (no .dvc/ here or above); run publish in the checkout "
        "where `dvc repro` built the packages"
    )
    assert list(tmp_path.iterdir()) == []


def test_version_and_help_list_choices_and_defaults() -> None:
    assert cli("--version").stdout.strip() == f"voxtral-coreml {__version__}"
    help_text = " ".join(cli("convert", "--help").stdout.split())  # argparse wraps lines
    assert f"(default: {BUILD['attention']})" in help_text and f"(default: {BUILD['query_chunk']})" in help_text
    for choice in ("fused_heads", "split_heads_chunked", "fp16", "int8", "pal4g", "mixed", "mistral", "mlx"):
        assert choice in help_text
    assert "{auto,mil,coreml,coreai}" in " ".join(cli("validate", "--help").stdout.split())
    assert "--format {coreml,coreai}" in help_text and "--attention-precision {fp32,fp16}" in help_text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "--checkpoint", "/no/such/dir", "--out", "x.mlpackage"], "/no/such/dir: checkpoint directory"),
        (["convert", "--checkpoint", ".", "--recipe", "int3", "--out", "x.mlpackage"], "invalid choice: 'int3'"),
        (["inspect", "/no/such.mlpackage"], "/no/manifest.json: not found"),
        (["convert", "--checkpoint", ".", "--family", "2507", "--streaming", "stateful", "--out", "x.mlpackage"],
         "--streaming: the 2507 encoders are bidirectional over 30 s windows and cannot stream"),
    ],
)  # fmt: skip
def test_errors_are_one_line_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert message in line
    assert list(tmp_path.iterdir()) == []
