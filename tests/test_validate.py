"""Validation executes what ships: a damaged package fails it, and every op it holds is one the runtime knows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import BUILD, DEMO_DIMS
from voxtral_coreml.check.milrun import SUPPORTED_OPS, load_package, program_op_types
from voxtral_coreml.check.validate import validate_package
from voxtral_coreml.encoders.reference import compute_reference
from voxtral_coreml.export.convert import MANIFEST, convert_package, package_name
from voxtral_coreml.export.package_info import SPEC_FILE
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.pipeline.errors import VoxtralError

FP16 = Recipe("fp16", "fp16", "iOS16", 50.0)
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"


@pytest.fixture(scope="module")
def package_and_reference(extracted: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("validate") / "fp16"
    folder.mkdir()
    convert_package(extracted, folder / package_name("Mini"), FP16, model_name="demo", variant="Mini", **BUILD)
    reference, _ = compute_reference(extracted, None, "split_heads", 256)
    return folder, reference


def _copy(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "pkg"
    shutil.copytree(folder, copy)
    return copy, copy / package_name("Mini")


def test_intact_package_passes_through_the_mil_runtime(package_and_reference) -> None:
    folder, reference = package_and_reference
    metrics, timings = validate_package(folder, reference, FP16.psnr_gate_db, backend="mil")
    assert set(timings) == {"load_s", "predict_s"} and not set(timings) & set(metrics)
    assert metrics["backend"] == "mil"
    assert metrics["psnr_db"] >= FP16.psnr_gate_db
    assert metrics["output_shape"] == [1, DEMO_DIMS.n_embeddings, DEMO_DIMS.hidden_size]


def test_changed_weight_bytes_fail_validation(package_and_reference, tmp_path: Path) -> None:
    folder, reference = package_and_reference
    copy, package = _copy(folder, tmp_path)
    weights = package / WEIGHTS
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = b"\x00\x3c" * 4  # four fp16 weights set to 1.0
    weights.write_bytes(bytes(data))
    with pytest.raises(VoxtralError, match="below the gate"):
        validate_package(copy, reference, FP16.psnr_gate_db, backend="mil")


def test_non_finite_outputs_fail_validation(package_and_reference, tmp_path: Path) -> None:
    folder, reference = package_and_reference
    copy, package = _copy(folder, tmp_path)
    weights = package / WEIGHTS
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 256] = b"\x7b" * 256  # fp16 0x7b7b = 61280: overflows to Inf downstream
    weights.write_bytes(bytes(data))
    with pytest.raises(VoxtralError, match="are NaN or Inf"):
        validate_package(copy, reference, FP16.psnr_gate_db, backend="mil")


def test_changed_softmax_axis_fails_validation(package_and_reference, tmp_path: Path) -> None:
    import coremltools as ct

    folder, reference = package_and_reference
    copy, package = _copy(folder, tmp_path)
    spec = ct.utils.load_spec(str(package))
    main = spec.mlProgram.functions["main"]
    ops = main.block_specializations[main.opset].operations
    softmax = next(op for op in ops if op.type == "softmax")
    axis_const = next(op for op in ops if op.outputs[0].name == softmax.inputs["axis"].arguments[0].name)
    axis_const.attributes["val"].immediateValue.tensor.ints.values[0] = 3  # queries instead of keys
    (package / SPEC_FILE).write_bytes(spec.SerializeToString())
    with pytest.raises(VoxtralError, match="below the gate"):
        validate_package(copy, reference, FP16.psnr_gate_db, backend="mil")


def test_contract_violations_are_named(package_and_reference, tmp_path: Path) -> None:
    folder, reference = package_and_reference
    copy, _ = _copy(folder, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["dims"]["hidden_size"] = 128
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VoxtralError, match=r"outputs are .*\[1, 375, 96\].*the contract is .*\[1, 375, 128\]"):
        validate_package(copy, reference, FP16.psnr_gate_db, backend="mil")


def test_coreml_backend_is_refused_off_macos(package_and_reference) -> None:
    folder, reference = package_and_reference
    with pytest.raises(VoxtralError, match="coreml needs macOS"):
        validate_package(folder, reference, FP16.psnr_gate_db, backend="coreml")


def test_every_op_in_the_demo_packages_is_supported(demo_repo: Path) -> None:
    packages = sorted((demo_repo / "artifacts" / "packages").glob("*/*/*.mlpackage"))
    assert packages
    for package in packages:
        op_types = set(program_op_types(load_package(package).program))
        assert op_types <= SUPPORTED_OPS, f"{package}: the MIL runtime lacks {sorted(op_types - SUPPORTED_OPS)}"


def expected_gflops(dims) -> float:
    """Multiply-adds x 2 per window, counted by hand from the architecture."""
    d, f, h, t = dims.d_model, dims.ffn_dim, dims.hidden_size, dims.mel_frames
    s = dims.n_positions
    convs = 2 * d * t * dims.n_mels * 3 + 2 * d * s * d * 3
    per_layer = 4 * 2 * d * s * d + 2 * 2 * f * s * d + 2 * 2 * s * s * d  # projections, FFN, QK and AV
    projector = 2 * h * dims.n_embeddings * 4 * d + 2 * h * dims.n_embeddings * h
    return (convs + dims.n_layers * per_layer + projector) / 1e9


def test_ane_report_counts_flops_and_finds_no_stray_layout_ops(package_and_reference) -> None:
    from voxtral_coreml.export.package_info import ane_report

    folder, _ = package_and_reference
    report = ane_report(folder / package_name("Mini"))
    assert report["gflops_per_window"] == pytest.approx(expected_gflops(DEMO_DIMS), rel=1e-3)
    # Only the contract's boundary: [1,128,3000] -> (1,128,1,3000) in, (1,H,1,375) -> [1,375,H] out.
    assert report["layout_ops_outside_attention"] == {"expand_dims": 1, "squeeze": 1, "transpose": 1}
    assert report["fp32_ops"] == {"cast": 1}  # the output cast back to float32; everything else is fp16
    assert report["ops_with_rank_over_4"] == 0
    assert report["weight_bytes"] > 0


def test_a_package_without_its_weights_is_named(package_and_reference, tmp_path: Path) -> None:
    folder, reference = package_and_reference
    copy, package = _copy(folder, tmp_path)
    (package / WEIGHTS).unlink()
    with pytest.raises(VoxtralError, match=rf"{package}: cannot rebuild the MIL program .*weight\.bin") as err:
        validate_package(copy, reference, FP16.psnr_gate_db, backend="mil")
    assert "\n" not in str(err.value)


def test_a_truncated_spec_is_named(package_and_reference, tmp_path: Path) -> None:
    folder, reference = package_and_reference
    copy, package = _copy(folder, tmp_path)
    spec = package / SPEC_FILE
    spec.write_bytes(spec.read_bytes()[: spec.stat().st_size // 2])
    with pytest.raises(VoxtralError, match=rf"{package}: the model spec cannot be read") as err:
        validate_package(copy, reference, FP16.psnr_gate_db, backend="mil")
    assert "\n" not in str(err.value)
