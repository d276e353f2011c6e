"""Compression recipes on a converted demo model, the op-name mapping, and the sensitivity scan behind `mixed`."""

from __future__ import annotations

import copy
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from conftest import BUILD, REPO
from voxtral_coreml.check.backends import run_mil
from voxtral_coreml.encoders.dims import WEIGHTS_FILE
from voxtral_coreml.encoders.model import VoxtralEncoderANE, build_ane_encoder
from voxtral_coreml.export import kmeans
from voxtral_coreml.export.compress import (
    clustering_ahead,
    compress_mlmodel,
    compressible_weights,
    decompress_mlmodel,
    deterministic_kmeans,
    module_lut_groups,
    palettized,
    program_lut_groups,
    program_weights,
    stored_tensor_sizes,
    weight_op_names,
)
from voxtral_coreml.export.convert import convert_package, convert_to_mlprogram
from voxtral_coreml.export.kmeans import group_key
from voxtral_coreml.export.package_info import SPEC_VERSION, package_structure
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.export.sensitivity import (
    DEFAULT_FRAMES,
    _stages,
    calibration_encoder,
    choose_bits,
    kmeans_tasks,
    predicted_psnr_db,
    program_bits,
    scan_sensitivity,
)
from voxtral_coreml.export.torch_compress import TORCH_KINDS
from voxtral_coreml.features.logmel import speech_mel
from voxtral_coreml.numerics.metrics import psnr_db
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted
from voxtral_coreml.sources.safetensors_io import TensorSpec, write_safetensors

# Recipes compressing the converted program (the torch-side kinds: test_calibrated.py).
RECIPES = sorted(
    p.stem
    for p in (REPO / "conf" / "recipe").glob("*.yaml")
    if yaml.safe_load(p.read_text())["kind"] not in TORCH_KINDS
)
WEIGHT_BLOB = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
# The constexpr op each recipe's weights become, and the range of their bytes as a fraction of fp16's
# (demo weights are small: a 256-entry LUT or a scale per block of 32 is a visible overhead).
EXPECTED = {
    "fp16": (None, (1.0, 1.0)),
    "int8": ("constexpr_affine_dequantize", (0.5, 0.55)),
    "pal8": ("constexpr_lut_to_dense", (0.5, 0.56)),
    "pal6": ("constexpr_lut_to_dense", (0.375, 0.4)),
    "pal4": ("constexpr_lut_to_dense", (0.25, 0.27)),
    "pal4g": ("constexpr_lut_to_dense", (0.25, 0.28)),
    "int4b": ("constexpr_blockwise_shift_scale", (0.25, 0.3)),
    "mixed": ("constexpr_lut_to_dense", None),  # average_bits / 16, checked below
}


def recipe(name: str, **overrides: object) -> Recipe:
    cfg = yaml.safe_load((REPO / "conf" / "recipe" / f"{name}.yaml").read_text())
    return Recipe.from_config(name, {**cfg, **overrides})


@pytest.fixture(scope="session")
def demo_model(extracted: Path) -> VoxtralEncoderANE:
    weights, dims, _ = load_extracted(extracted, dtype=torch.float16)  # as convert_package builds it
    return build_ane_encoder(weights, dims, BUILD["attention"], BUILD["query_chunk"])


@pytest.fixture(scope="session")
def programs(demo_model: VoxtralEncoderANE) -> dict[str, object]:
    return {target: convert_to_mlprogram(demo_model, target) for target in ("iOS16", "iOS18")}


@pytest.fixture
def workers_for_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes even for a demo model's few weights, which are otherwise clustered in the pass."""
    monkeypatch.setattr(kmeans, "WORTH_WORKERS", 0)


@pytest.fixture(scope="session")
def sensitivity(extracted: Path) -> dict:
    return scan_sensitivity(extracted, recipe("mixed"))


def compress(name: str, programs: dict, demo_model: torch.nn.Module, sensitivity: dict, jobs: int | None = None):
    """With `jobs` > 1, as a conversion does: k-means starts on the module's weights in the background."""
    r = recipe(name)
    program = programs[r.min_target]
    bits = program_bits(sensitivity, r, program, demo_model) if r.kind == "mixed" else None
    with clustering_ahead(lambda: demo_model, r, jobs) as ahead:
        return compress_mlmodel(program, r, bits, jobs, ahead)


def saved(mlmodel, path: Path) -> Path:
    mlmodel.save(str(path))
    return path


def test_every_recipe_config_loads() -> None:
    assert set(RECIPES) == set(EXPECTED)
    for name in RECIPES:
        assert recipe(name).name == name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "pal9"}, r"recipe 'pal4': unsupported kind 'pal9'"),
        ({"nbits": 5}, r"recipe 'pal4': nbits 5 is not one of 1, 2, 3, 4, 6, 8"),
        ({"granularity": "per_grouped_channel"}, r"recipe 'pal4': missing key 'group_size'"),
        ({"weight_threshold": -1}, r"recipe 'pal4': weight_threshold -1 is not a non-negative integer"),
        ({"seed": 3}, r"recipe 'pal4': unknown key 'seed' for kind palettize"),
        ({"group_size": 16}, r"recipe 'pal4': unknown key 'group_size'"),
        ({"min_target": "iOS15"}, r"recipe 'pal4': unknown min_target 'iOS15'"),
    ],
)
def test_bad_recipe_is_one_line_naming_recipe_and_key(overrides: dict, message: str) -> None:
    with pytest.raises(VoxtralError, match=message) as err:
        recipe("pal4", **overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["pal4g", "int4b"])
def test_ios18_recipes_refuse_an_older_target(name: str) -> None:
    message = rf"recipe '{name}': .* needs min_target iOS18 \(macOS 15\.0\) or later, got iOS16"
    with pytest.raises(VoxtralError, match=message):
        recipe(name, min_target="iOS16")


def test_mixed_target_must_lie_within_the_candidates() -> None:
    with pytest.raises(VoxtralError, match=r"recipe 'mixed': target_bits 3 is outside candidate_bits \[4, 6, 8\]"):
        recipe("mixed", target_bits=3)
    with pytest.raises(VoxtralError, match=r"recipe 'mixed': candidate_bits \[4, 5\] is not a list"):
        recipe("mixed", candidate_bits=[4, 5])


def test_convert_package_ships_the_recipe_and_records_it(extracted: Path, tmp_path: Path) -> None:
    manifest = convert_package(
        extracted, tmp_path / "x.mlpackage", recipe("pal4"), model_name="demo", variant="Mini", **BUILD
    )
    assert manifest["recipe"]["name"] == "pal4" and manifest["recipe"]["params"]["nbits"] == 4
    assert set(manifest["compression"]["bits_per_op"].values()) == {4}
    assert manifest["ane"]["ops"].get("constexpr_lut_to_dense", 0) > 0


def test_mixed_needs_its_sensitivity_scan(extracted: Path, tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match="recipe 'mixed': a mixed recipe needs its sensitivity scan"):
        convert_package(
            extracted, tmp_path / "x.mlpackage", recipe("mixed"), model_name="demo", variant="Mini", **BUILD
        )
    assert not (tmp_path / "x.mlpackage").exists()


def test_missing_common_key_names_it() -> None:
    with pytest.raises(VoxtralError, match=r"recipe 'x': missing key 'psnr_gate_db'"):
        Recipe.from_config("x", {"kind": "fp16", "min_target": "iOS16"})


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_compresses_its_weights_and_saves(
    name: str, programs: dict, demo_model: torch.nn.Module, sensitivity: dict, tmp_path: Path
) -> None:
    r = recipe(name)
    fp16 = saved(programs[r.min_target], tmp_path / "fp16.mlpackage")
    compressed, info = compress(name, programs, demo_model, sensitivity)
    package = saved(compressed, tmp_path / f"{name}.mlpackage")

    structure = package_structure(package)
    assert structure["spec_version"] == SPEC_VERSION[r.min_target]
    op_type, ratio_range = EXPECTED[name]
    constexpr = {k: v for k, v in structure["ops"].items() if k.startswith("constexpr_")}
    n_weights = len(compressible_weights(demo_model, 2048))
    assert constexpr == ({op_type: n_weights} if op_type else {})
    assert info["recipe"] == name and info["deployment_target"] == r.min_target
    assert len(info["bits_per_op"]) == (n_weights if op_type else 0)

    # Bytes of the compressed weights over their fp16 bytes; everything else in the blob is unchanged.
    fp16_bytes = 2 * sum(v.size for v in program_weights(programs[r.min_target], 2048).values())
    ratio = ((package / WEIGHT_BLOB).stat().st_size - (fp16 / WEIGHT_BLOB).stat().st_size + fp16_bytes) / fp16_bytes
    average = info.get("compressed_average_bits", 16.0)  # of the compressed weights
    low, high = ratio_range or (average / 16, average / 16 + 0.05)
    assert low - 0.005 <= ratio <= high, f"{name}: {ratio:.3f} of fp16"
    # average_bits counts every stored tensor, those left fp16 included: the blob's bytes per element, near enough.
    stored = stored_tensor_sizes(programs[r.min_target])
    assert average <= info["average_bits"] <= 16 and (info["average_bits"] < 16) == (op_type is not None)
    assert abs(info["average_bits"] / 8 * sum(stored.values()) / (package / WEIGHT_BLOB).stat().st_size - 1) < 0.1


def test_grouped_recipe_refuses_a_program_converted_for_ios16(programs: dict) -> None:
    with pytest.raises(VoxtralError, match=r"recipe 'pal4g': granularity per_grouped_channel needs a program .*iOS18"):
        compress_mlmodel(programs["iOS16"], recipe("pal4g"))


def test_unsplittable_weight_is_an_error_not_a_silent_skip(programs: dict) -> None:
    # coremltools only warns and skips a weight whose 64 output channels do not split into groups of 48.
    with pytest.raises(VoxtralError, match=r"recipe 'pal4g': weight '.*' \[.*\] was left uncompressed"):
        compress_mlmodel(programs["iOS18"], recipe("pal4g", group_size=48))


def test_a_weight_of_exactly_weight_threshold_elements_stays_fp16(programs: dict, demo_model) -> None:
    sizes = sorted({p.numel() for p in compressible_weights(demo_model, 0).values()})
    threshold = sizes[0]  # the smallest conv/linear weights have exactly this many elements: left fp16, not an error
    compressed, info = compress_mlmodel(programs["iOS16"], recipe("pal6", weight_threshold=threshold))
    assert len(program_weights(compressed, threshold)) == 0
    assert len(info["bits_per_op"]) == len(compressible_weights(demo_model, threshold)) > 0


def test_kmeans_tasks_leave_the_models_storage_alone() -> None:
    from multiprocessing.reduction import ForkingPickler

    weight = torch.nn.Parameter(torch.ones(8, 8))
    (task,) = kmeans_tasks({"w": weight}, (4,))
    ForkingPickler.dumps(task)  # what a process pool's feeder thread does with a task, beside the running scan
    assert task[0].is_shared() and not weight.is_shared()


def test_mixed_needs_bits_for_every_weight(programs: dict, demo_model: torch.nn.Module, sensitivity: dict) -> None:
    r = recipe("mixed")
    with pytest.raises(VoxtralError, match="needs per-op bits from the sensitivity scan"):
        compress_mlmodel(programs["iOS16"], r)
    bits = program_bits(sensitivity, r, programs["iOS16"], demo_model)
    fc1 = weight_op_names(programs["iOS16"], demo_model, 2048)["layers.1.fc1"]
    with pytest.raises(VoxtralError, match=rf"no bits for weight '{fc1}'"):
        compress_mlmodel(programs["iOS16"], r, {k: v for k, v in bits.items() if k != fc1})
    with pytest.raises(VoxtralError, match=rf"5 bits for '{fc1}' is not in candidate_bits"):
        compress_mlmodel(programs["iOS16"], r, {**bits, fc1: 5})
    with pytest.raises(VoxtralError, match="'conv_9' is not a compressible weight"):
        compress_mlmodel(programs["iOS16"], r, {**bits, "conv_9": 4})
    stale = recipe("mixed", candidate_bits=[4, 8])
    with pytest.raises(VoxtralError, match=r"candidate_bits is \[4, 8\], the sensitivity scan used \[4, 6, 8\]"):
        program_bits(sensitivity, stale, programs["iOS16"], demo_model)


@pytest.mark.parametrize("name", ["pal4", "pal4g", "mixed"])
def test_kmeans_compression_is_byte_identical(
    name: str, programs: dict, demo_model: torch.nn.Module, sensitivity: dict, tmp_path: Path, workers_for_any_size
) -> None:
    # One k-means process, then two (coremltools' pool, one LUT group per task): the same bytes.
    first = saved(compress(name, programs, demo_model, sensitivity, jobs=1)[0], tmp_path / "a.mlpackage")
    second = saved(compress(name, programs, demo_model, sensitivity, jobs=2)[0], tmp_path / "b.mlpackage")
    assert (first / WEIGHT_BLOB).read_bytes() == (second / WEIGHT_BLOB).read_bytes()


def test_luts_clustered_ahead_are_coremltools_own_kmeans(
    programs: dict, caplog: pytest.LogCaptureFixture, workers_for_any_size
) -> None:
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    # Worker processes cluster every LUT group before the pass (a per-tensor LUT is one group): the pass finds all.
    with caplog.at_level(logging.INFO, logger="voxtral_coreml.export.compress"):
        compressed, _ = compress_mlmodel(programs["iOS18"], recipe("pal4g"), jobs=2)
    assert "k-means: 0 LUT groups clustered by the pass itself" in caplog.text
    # ...and they are the LUTs coremltools' "kmeans" mode computes for each weight, groups of 16 output channels.
    with deterministic_kmeans():
        expected = {
            palettize_weights.decompress(
                palettize_weights.blockwise_compress(w, "KMEANS", 4, [16] + [0] * (w.ndim - 1))
            ).tobytes()
            for w in program_weights(programs["iOS18"], 2048).values()
        }
    decoded = {w.tobytes() for w in program_weights(decompress_mlmodel(compressed), 2048).values()}
    assert decoded == expected and len(expected) > 4


def test_small_work_is_clustered_by_the_pass_without_workers(programs: dict, caplog: pytest.LogCaptureFixture) -> None:
    # A demo model's weights: starting worker processes would cost more than clustering them in the pass.
    with caplog.at_level(logging.INFO, logger="voxtral_coreml.export"):
        compress_mlmodel(programs["iOS18"], recipe("pal4g"), jobs=2)
    assert "clustered in 2 processes" not in caplog.text
    assert re.search(r"k-means: [1-9]\d* LUT groups clustered by the pass itself", caplog.text)


def test_the_modules_lut_groups_are_the_programs(programs: dict, demo_model: VoxtralEncoderANE) -> None:
    import coremltools.optimize.coreml as cto

    # What LutsAhead clusters while the module converts is what the pass will ask for, byte for byte: every weight
    # of the program is a module parameter as it is (q's scale is in q_proj's weights already: no pass rewrites one).
    r = recipe("pal4g")
    config = cto.OpPalettizerConfig(mode="kmeans", **r.params)
    module = {group_key(*group) for group in module_lut_groups(lambda: demo_model, r)}
    known: dict[bool, set[bool]] = {True: set(), False: set()}  # module parameter or not -> groups found or not
    for name in program_weights(programs["iOS18"], 2048):
        groups = program_lut_groups(programs["iOS18"], {name: config})
        known[name.startswith("p_")] |= {group_key(*group) in module for group in groups}
    assert known == {True: {True}, False: set()}


def test_op_names_map_module_weights_onto_program_consts(programs: dict, demo_model: VoxtralEncoderANE) -> None:
    names = weight_op_names(programs["iOS16"], demo_model, 2048)
    consts = program_weights(programs["iOS16"], 2048)
    assert sorted(names.values()) == sorted(consts)
    for op, const in names.items():
        weight = demo_model.get_parameter(f"{op}.weight").detach()
        assert np.array_equal(consts[const], weight.half().numpy()), op


def test_op_names_refuse_a_program_of_other_weights(programs: dict, demo_model: VoxtralEncoderANE) -> None:
    other = copy.deepcopy(demo_model)
    torch.nn.init.normal_(other.get_parameter("layers.1.fc2.weight"))
    with pytest.raises(VoxtralError, match=r"no Core ML weight matches module weight 'layers.1.fc2' \[64, 256, 1, 1\]"):
        weight_op_names(programs["iOS16"], other, 2048)


def decompressed_module(compressed, model: VoxtralEncoderANE) -> VoxtralEncoderANE:
    """The module holding the package's weights, decompressed: the package's numbers, in fp32 compute."""
    program = decompress_mlmodel(compressed)
    values = program_weights(program, 2048)
    clone = copy.deepcopy(model).float()
    for op, const in weight_op_names(program, model, 2048).items():
        clone.get_parameter(f"{op}.weight").data = torch.from_numpy(values[const].astype(np.float32))
    return clone


def test_sensitivity_simulates_the_packages_own_lut(programs: dict, demo_model: VoxtralEncoderANE) -> None:
    compressed, _ = compress_mlmodel(programs["iOS16"], recipe("pal4"))
    package_weights = decompressed_module(compressed, demo_model)
    for op, weight in compressible_weights(demo_model, 2048).items():
        simulated = palettized(weight, 4)
        assert torch.equal(package_weights.get_parameter(f"{op}.weight"), simulated), op


@pytest.mark.parametrize("name", RECIPES)
def test_package_computes_what_its_decompressed_weights_compute(
    name: str, programs: dict, demo_model: VoxtralEncoderANE, sensitivity: dict, tmp_path: Path
) -> None:
    compressed, _ = compress(name, programs, demo_model, sensitivity)
    mel = speech_mel()
    embeddings, _ = run_mil(saved(compressed, tmp_path / f"{name}.mlpackage"), mel)
    with torch.no_grad():
        expected = decompressed_module(compressed, demo_model)(mel)
    # The MIL runtime rounds activations to fp16 as the device does; the weights must be the same.
    assert psnr_db(expected, embeddings.reshape(expected.shape)) >= 55


@pytest.mark.parametrize(("name", "min_weight_psnr"), [("int8", 40), ("pal8", 40), ("pal4", 18), ("int4b", 18)])
def test_decompressed_weights_stay_close_to_the_originals(
    name: str, min_weight_psnr: float, programs: dict, demo_model: VoxtralEncoderANE, sensitivity: dict
) -> None:
    package_weights = decompressed_module(compress(name, programs, demo_model, sensitivity)[0], demo_model)
    for op, weight in compressible_weights(demo_model, 2048).items():
        assert psnr_db(weight.detach(), package_weights.get_parameter(f"{op}.weight")) >= min_weight_psnr, op


def test_choose_bits_meets_the_target_at_the_least_noise() -> None:
    table = {
        "candidate_bits": [4, 6, 8],
        "ops": {
            "robust": {"params": 100, "psnr_db": {"4": 40.0, "6": 52.0, "8": 64.0}},
            "fragile": {"params": 100, "psnr_db": {"4": 20.0, "6": 32.0, "8": 44.0}},
            "small": {"params": 10, "psnr_db": {"4": 30.0, "6": 42.0, "8": 54.0}},
        },
    }
    assert choose_bits(table, 8) == {"robust": 8, "fragile": 8, "small": 8}
    assert choose_bits(table, 4) == {"robust": 4, "fragile": 4, "small": 4}
    bits = choose_bits(table, 6)
    assert bits["robust"] < bits["fragile"]
    assert sum(bits[op] * e["params"] for op, e in table["ops"].items()) <= 6 * 210
    with pytest.raises(VoxtralError, match="target_bits 3 is below the narrowest candidate, 4 bits"):
        choose_bits(table, 3)


@pytest.mark.parametrize("target", [4, 4.5, 5, 6, 7.5, 8])
def test_demo_allocation_meets_every_target(sensitivity: dict, target: float) -> None:
    bits = choose_bits(sensitivity, target)
    sizes = {op: e["params"] for op, e in sensitivity["ops"].items()}
    assert sum(bits[op] * sizes[op] for op in bits) <= target * sum(sizes.values()) + 1e-6
    # Never worse than the uniform choice at the same budget, when there is one.
    if target in sensitivity["candidate_bits"]:
        uniform = dict.fromkeys(bits, target)
        assert predicted_psnr_db(sensitivity, bits) >= predicted_psnr_db(sensitivity, uniform) - 1e-9


def simulated_psnr(extracted: Path, bits: dict[str, int], frames: int) -> float:
    model, mel = calibration_encoder(extracted, frames)
    with torch.no_grad():
        reference = model(mel)
        for op, b in bits.items():
            weight = model.get_parameter(f"{op}.weight")
            weight.data = palettized(weight, b)
        return psnr_db(reference, model(mel))


def test_noise_adds_up_across_ops(extracted: Path, sensitivity: dict) -> None:
    # choose_bits' premise: the PSNR of all ops compressed together is predicted by summing their noise.
    assert simulated_psnr(extracted, sensitivity["bits"], DEFAULT_FRAMES) == pytest.approx(
        sensitivity["predicted_psnr_db"], abs=1.5
    )


def test_scan_records_the_table_and_the_choice(sensitivity: dict, demo_model: VoxtralEncoderANE) -> None:
    assert sensitivity["ops"].keys() == compressible_weights(demo_model, 2048).keys() == sensitivity["bits"].keys()
    assert sensitivity["average_bits"] <= sensitivity["target_bits"] == 5
    assert sensitivity["cost"] == {"stage_runs": 120, "kmeans_runs": 48}
    for entry in sensitivity["ops"].values():  # fewer bits, more noise
        assert entry["psnr_db"]["4"] < entry["psnr_db"]["6"] < entry["psnr_db"]["8"]


def test_short_window_ranks_ops_like_the_full_window(extracted: Path, sensitivity: dict) -> None:
    full = scan_sensitivity(extracted, recipe("mixed", candidate_bits=[4, 8], target_bits=6), frames=3000)
    for bits in ("4", "8"):
        ranks = [(full["ops"][op]["psnr_db"][bits], e["psnr_db"][bits]) for op, e in sensitivity["ops"].items()]
        assert spearmanr(*zip(*ranks, strict=True)).statistic >= 0.95, bits


def test_parallel_jobs_give_the_same_table(extracted: Path, sensitivity: dict) -> None:
    assert scan_sensitivity(extracted, recipe("mixed"), jobs=2) == sensitivity


def with_fragile_weight(extracted: Path, dest: Path, op: str) -> Path:
    """A copy of the extracted weights where one weight has 1 in 13 values 50x too large: a per-tensor palette must
    stretch over them, and the bulk of the weight collapses onto a few entries."""
    shutil.copytree(extracted, dest)
    weights, _, _ = load_extracted(extracted)
    weights[f"audio_tower.{op}.weight"].view(-1)[::13] *= 50.0
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in weights.items()]
    write_safetensors(dest / WEIGHTS_FILE, specs, lambda spec: weights[spec.name])
    return dest


def test_sensitivity_ranks_a_fragile_weight_first(extracted: Path, tmp_path: Path) -> None:
    fragile, twin = "layers.0.fc2", "layers.1.fc2"  # the same shape, so the same cost per bit
    table = scan_sensitivity(with_fragile_weight(extracted, tmp_path / "fragile", fragile), recipe("mixed"))
    at_4_bits = sorted(table["ops"], key=lambda op: table["ops"][op]["psnr_db"]["4"])
    assert at_4_bits[0] == fragile
    assert table["ops"][at_4_bits[1]]["psnr_db"]["4"] - table["ops"][fragile]["psnr_db"]["4"] >= 2.0
    assert table["bits"][fragile] >= table["bits"][twin]


def test_scan_stages_cover_the_whole_encoder(extracted: Path) -> None:
    model, mel = calibration_encoder(extracted, DEFAULT_FRAMES)
    x = mel
    with torch.no_grad():
        for stage in _stages(model):
            x = stage(x)
        assert torch.equal(x, model(mel))
    assert mel.shape[-1] == DEFAULT_FRAMES
    with pytest.raises(VoxtralError, match="frames 3001 is outside"):
        calibration_encoder(extracted, 3001)
    with pytest.raises(VoxtralError, match="not a multiple of 8"):
        calibration_encoder(extracted, 1001)


def test_scan_is_for_mixed_recipes_only(extracted: Path) -> None:
    with pytest.raises(VoxtralError, match="the sensitivity scan is for mixed recipes, not palettize"):
        scan_sensitivity(extracted, recipe("pal4"))
