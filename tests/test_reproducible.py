"""Same model and recipe, same bytes: canonical packages, and a from-scratch rerun that leaves dvc.lock as it is."""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from conftest import DVC, GIT, REPO, clone, output_digests, run, tree_digests, write_checkpoint
from voxtral_coreml.export.canonical import (
    CONVERSION_DATE_KEY,
    PACKAGE_MANIFEST,
    canonicalize_package,
    item_identifier,
)
from voxtral_coreml.export.package_info import SPEC_FILE
from voxtral_coreml.pipeline.errors import VoxtralError

PACKAGE = "VoxtralEncoderMini.mlpackage"
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights"


@pytest.fixture(scope="module")
def two_conversions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same checkpoint converted twice, each by its own process (protobuf map order and uuid4 vary there)."""
    root = tmp_path_factory.mktemp("twice")
    checkpoint = write_checkpoint(root / "checkpoint")
    outs = (root / "first", root / "second")
    for out in outs:
        cmd = [
            sys.executable,
            "-m",
            "voxtral_coreml.cli",
            "convert",
            "--checkpoint",
            str(checkpoint),
            "--variant",
            "Mini",
        ]
        run([*cmd, "--out", str(out)], REPO)  # cwd REPO: this checkout's library, not an installed one
    return outs


def test_two_conversions_in_separate_processes_are_byte_identical(two_conversions: tuple[Path, Path]) -> None:
    first, second = (tree_digests(out) for out in two_conversions)
    assert first == second
    assert sorted(first) == [
        f"{PACKAGE}/Data/com.apple.CoreML/model.mlmodel",
        f"{PACKAGE}/Data/com.apple.CoreML/weights/weight.bin",
        f"{PACKAGE}/{PACKAGE_MANIFEST}",
        "manifest.json",
    ]  # no executorch_debug_handle_mapping.json


def test_dvc_hashes_the_two_conversions_alike(two_conversions: tuple[Path, Path]) -> None:
    root = two_conversions[0].parent
    run([DVC, "init", "--no-scm", "-q"], root)
    run([DVC, "add", *(out.name for out in two_conversions)], root)
    hashes = [(root / f"{out.name}.dvc").read_text().split("md5: ")[1].split()[0] for out in two_conversions]
    assert hashes[0] == hashes[1] and hashes[0].endswith(".dir")


def test_the_canonical_package_is_what_core_ml_loads(two_conversions: tuple[Path, Path]) -> None:
    import coremltools as ct
    from coremltools import libmodelpackage
    from coremltools.converters.mil.frontend.milproto.load import load

    package = two_conversions[0] / PACKAGE
    model = ct.models.MLModel(str(package), skip_model_load=True)
    assert CONVERSION_DATE_KEY not in model.user_defined_metadata
    assert model.user_defined_metadata["com.github.apple.coremltools.version"] == ct.__version__
    spec = ct.utils.load_spec(str(package))
    program = load(spec, spec.specificationVersion, str(package / WEIGHTS))
    assert list(program.functions) == ["main"]

    # Core ML's own package reader (coremltools ships the same C++ code): the root is the spec item.
    assert libmodelpackage.ModelPackage.isValid(str(package))
    reader = libmodelpackage.ModelPackage(str(package))
    manifest = json.loads((package / PACKAGE_MANIFEST).read_text())
    assert reader.getRootModel().identifier() == manifest["rootModelIdentifier"]
    assert Path(reader.getRootModel().path()) == package / SPEC_FILE
    assert Path(reader.findItemByNameAuthor("weights", "com.apple.CoreML").path()) == package / WEIGHTS
    for identifier, entry in manifest["itemInfoEntries"].items():
        assert identifier == item_identifier(entry["path"], package / "Data")
        assert uuid.UUID(identifier).version == 5


def test_canonicalize_undoes_what_coremltools_varies(two_conversions: tuple[Path, Path], tmp_path: Path) -> None:
    from coremltools.proto import Model_pb2

    canonical = two_conversions[0] / PACKAGE
    package = Path(shutil.copytree(canonical, tmp_path / PACKAGE))
    # What a fresh save looks like: random item ids, a conversion date, the ExecuTorch debug mapping.
    manifest = json.loads((package / PACKAGE_MANIFEST).read_text())
    renamed = {old: str(uuid.uuid4()) for old in manifest["itemInfoEntries"]}
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    (package / PACKAGE_MANIFEST).write_text(json.dumps(manifest))
    spec = Model_pb2.Model.FromString((package / SPEC_FILE).read_bytes())
    spec.description.metadata.userDefined[CONVERSION_DATE_KEY] = "2031-01-02"
    (package / SPEC_FILE).write_bytes(spec.SerializeToString())
    (package / "executorch_debug_handle_mapping.json").write_text('{"mapping": {"null": []}}')

    canonicalize_package(package)
    assert tree_digests(package) == tree_digests(canonical)
    canonicalize_package(package)  # idempotent
    assert tree_digests(package) == tree_digests(canonical)


def test_a_package_without_a_valid_manifest_is_named(tmp_path: Path) -> None:
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / PACKAGE_MANIFEST).write_text('{"itemInfoEntries": {}, "rootModelIdentifier": "x"}')
    with pytest.raises(VoxtralError, match=rf"{PACKAGE_MANIFEST}: rootModelIdentifier names no item") as err:
        canonicalize_package(package)
    assert str(package) in str(err.value) and "\n" not in str(err.value)


# One of each kind of work the pipeline does: every stage, and each compression kind (none, linear, grouped LUT,
# sensitivity-driven mixed LUTs). Rerunning all twenty entries would prove nothing more, at twice the CI time.
RERUN_MODEL = "demo-mini"
RERUN_RECIPES = ("fp16", "int8", "pal4g", "mixed")
RERUN_COREAI = "pal4g"  # a Core AI asset too (k-means included); its validation adds nothing to the bytes


def test_a_fresh_clone_reruns_the_demo_to_the_same_dvc_lock(demo_repo: Path, tmp_path: Path) -> None:
    """The proof of reproducibility: no cache, no artifacts, every kind of stage rerun, dvc.lock unchanged."""
    fresh = clone(demo_repo, tmp_path / "fresh")
    targets = [f"validate@{RERUN_MODEL}-{recipe}" for recipe in RERUN_RECIPES] + ["mel@fp32"]
    targets.append(f"convert-coreai@{RERUN_MODEL}-{RERUN_COREAI}")
    result = run([DVC, "repro", *targets], fresh)
    for stage in ("download", "extract", "build"):
        assert f"Running stage '{stage}@{RERUN_MODEL}'" in result.stdout
    for stage in ("sensitivity", "convert", "validate"):
        assert f"Running stage '{stage}@{RERUN_MODEL}-mixed'" in result.stdout
    assert "Running stage 'mel@fp32'" in result.stdout
    assert f"Running stage 'convert-coreai@{RERUN_MODEL}-{RERUN_COREAI}'" in result.stdout
    run([*GIT, "diff", "--exit-code", "dvc.lock"], fresh)

    rebuilt = output_digests(fresh)
    assert len(rebuilt) > 20
    assert rebuilt == {path: digest for path, digest in output_digests(demo_repo).items() if path in rebuilt}
    expected = {f"{RERUN_MODEL}/{recipe}.json" for recipe in RERUN_RECIPES}
    assert set(tree_digests(fresh / "artifacts" / "timings")) == expected
