"""Torch-side recipes (gptq, skm, ptp: coremltools.optimize.torch before conversion) on the demo model: the ops they
become, their fidelity, their cached calibration, and byte-identical packages for the same inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import BUILD, DEMO_PROMOTE_SHARE, RECIPE_CONFIGS, TINY_CALIBRATION, demo_recipe, tree_digests
from voxtral_coreml.check.backends import run_mil
from voxtral_coreml.encoders.model import build_ane_encoder
from voxtral_coreml.export.calibration import calibrate
from voxtral_coreml.export.convert import convert_package
from voxtral_coreml.export.package_info import package_structure
from voxtral_coreml.export.torch_compress import (
    TORCH_KINDS,
    apply_compressed,
    choose_promoted,
    load_calibration,
    save_calibration,
)
from voxtral_coreml.features.logmel import speech_mel
from voxtral_coreml.numerics.metrics import psnr_db
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted

# One recipe per kind is built here (each costs two calibrations and two conversions); every recipe of conf/recipe/
# is measured on trained weights by benchmarks/trained.py. The constexpr ops its weights become (per-channel scales
# on a LUT add a blockwise op per weight), and its floor vs the fp32 module on demo (random) weights: far above what
# a misread scale or LUT gives (< 5 dB).
BUILT = {
    "gptq4": ({"constexpr_blockwise_shift_scale"}, 18),
    "skm6g": ({"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}, 28),
    "pal6s": ({"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}, 28),
}


def test_one_recipe_of_each_kind_is_built_and_every_recipe_is_valid() -> None:
    assert sorted(RECIPE_CONFIGS[name]["kind"] for name in BUILT) == sorted(TORCH_KINDS)
    torch_recipes = [name for name, cfg in RECIPE_CONFIGS.items() if cfg["kind"] in TORCH_KINDS]
    assert all(demo_recipe(name).kind in TORCH_KINDS for name in torch_recipes)  # each parses: keys, values, target


@pytest.fixture(scope="module", params=sorted(BUILT))
def built(request: pytest.FixtureRequest, extracted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each recipe calibrated twice and converted twice from the cache: what the tests below compare."""
    name, root = request.param, tmp_path_factory.mktemp(request.param)
    states = []
    for i in range(2):
        state, info = calibrate(extracted, demo_recipe(name), jobs=2 if i else 1)  # k-means workers: same result
        save_calibration(root / f"calibration{i}.safetensors", state, info)
        states.append(load_calibration(root / f"calibration{i}.safetensors"))
    packages = []
    for i in range(2):
        folder = root / f"package{i}"
        package = folder / "VoxtralEncoderMini.mlpackage"
        convert_package(
            extracted, package, demo_recipe(name), model_name="demo", variant="Mini", calibrated=states[0], **BUILD
        )
        packages.append(folder)
    return {"name": name, "states": states, "packages": packages, "info": info}


def test_calibration_is_deterministic_and_cached_whole(built: dict) -> None:
    first, second = built["states"]
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any("._COREML_/weight/" in k for k in first)


def test_same_inputs_give_byte_identical_packages(built: dict) -> None:
    first, second = (tree_digests(p) for p in built["packages"])
    assert first == second


def test_package_holds_the_recipes_compressed_ops(built: dict, extracted: Path) -> None:
    package = built["packages"][0] / "VoxtralEncoderMini.mlpackage"
    ops = {k for k in package_structure(package)["ops"] if k.startswith("constexpr_")}
    expected_ops, min_db = BUILT[built["name"]]
    assert ops == expected_ops
    weights, dims, _ = load_extracted(extracted)
    mel = speech_mel()
    with torch.inference_mode():
        expected = build_ane_encoder(weights, dims, "fused_heads")(mel)
    got, _ = run_mil(package, mel)
    assert psnr_db(expected, got.reshape(expected.shape)) >= min_db


def test_manifest_records_bits_and_calibration_info(built: dict) -> None:
    import json

    manifest = json.loads((built["packages"][0] / "manifest.json").read_text())
    r = demo_recipe(built["name"])
    bits = r.params.get("n_bits") or int(r.params["weight_dtype"].removeprefix("uint"))
    promote = r.params.get("promote")
    recorded = manifest["compression"]["bits_per_op"]
    assert set(recorded.values()) == ({bits, promote["n_bits"]} if promote else {bits})
    if promote:  # the LUTs say so too: 2^bits entries
        luts = {k.split("._COREML_/")[0]: v for k, v in built["states"][0].items() if k.endswith("weight/lut")}
        promoted = {name for name, lut in luts.items() if lut.shape[-2] == 2 ** promote["n_bits"]}
        assert promoted == {name for name, b in recorded.items() if b == promote["n_bits"]}
    assert manifest["compression"]["kept_fp16"] == []
    info = built["info"]
    assert info["device"] == "cpu" and info["seconds"] >= 0 and info["peak_rss_gib"] > 0


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("gptq4", {"calibration": {"clips": 0, "seconds": 5, "first": 0, "device": "cpu"}}, r"calibration .* is not"),
        ("gptq4", {"calibration": {"clips": 1, "seconds": 40, "first": 0, "device": "cpu"}}, r"seconds \(at most 30\)"),
        ("gptq4", {"weight_dtype": "int3"}, r"recipe 'gptq4': weight_dtype 'int3' is not one of uint4, uint8"),
        ("skm4g", {"calibration": {"clips": 1, "seconds": 5, "first": 0, "device": "tpu"}}, r"device \(cpu, cuda"),
        ("pal4s", {"min_target": "iOS16"}, r"recipe 'pal4s': .* needs min_target iOS18"),
        ("gptq8", {"lut_dtype": "int8"}, r"recipe 'gptq8': unknown key 'lut_dtype' for kind gptq"),
        ("skm6g", {"promote": {"n_bits": 6, "share": 0.02}}, r"recipe 'skm6g': promote.n_bits 6 is not above n_bits"),
        ("skm6g", {"promote": {"n_bits": 8, "share": 2}}, r"recipe 'skm6g': promote .* is not null or \{n_bits"),
    ],
)
def test_bad_torch_recipe_is_one_line_naming_recipe_and_key(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(VoxtralError, match=message) as err:
        demo_recipe(name, **overrides)
    assert "\n" not in str(err.value)


def test_torch_recipe_needs_its_calibration(extracted: Path, tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match=r"recipe 'gptq4': compressed weights are for"):
        convert_package(
            extracted, tmp_path / "x.mlpackage", demo_recipe("gptq4"), model_name="demo", variant="Mini", **BUILD
        )
    assert not (tmp_path / "x.mlpackage").exists()


def test_unavailable_calibration_device_is_named(extracted: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the message is about a missing accelerator
    with pytest.raises(VoxtralError, match=r"calibration.device 'cuda' is not available on this machine"):
        calibrate(extracted, demo_recipe("gptq4", calibration={**TINY_CALIBRATION, "device": "cuda"}))


def test_promotion_takes_the_most_noise_per_parameter_within_its_share() -> None:
    damage = {"a": 8.0, "b": 6.0, "c": 1.0, "d": 3.0}
    sizes = {"a": 4, "b": 2, "c": 1, "d": 1}  # noise per parameter: b 3, d 3, a 2, c 1; half of 8 parameters: 4
    assert choose_promoted(damage, sizes, share=0.5) == ["b", "c", "d"]  # a does not fit after b and d; c does
    assert choose_promoted(damage, sizes, share=0.1) == []


def test_promoting_the_damaging_weights_lowers_the_output_error(extracted: Path) -> None:
    """skm6g with and without promotion, same calibration: the promoted weights' 8 bits cut the output's error."""
    weights, dims, _ = load_extracted(extracted)
    mel = speech_mel()
    with torch.inference_mode():
        expected = build_ane_encoder(weights, dims, "fused_heads")(mel)
    psnr = {}
    for promote in (None, {"n_bits": 8, "share": DEMO_PROMOTE_SHARE}):
        state, _ = calibrate(extracted, demo_recipe("skm6g", promote=promote))
        model = build_ane_encoder(weights, dims, "fused_heads")
        apply_compressed(model, state)
        with torch.inference_mode():
            psnr[bool(promote)] = psnr_db(expected, model(mel))
    assert psnr[True] > psnr[False] + 1, psnr
