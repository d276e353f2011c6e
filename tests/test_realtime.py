"""Voxtral Realtime: the ANE modules against transformers (offline and streaming), its checkpoint layouts, and
its packages (offline window, stateful and explicit streaming steps) executed by the MIL runtime."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import VoxtralRealtimeForConditionalGeneration

from conftest import BUILD, cli, demo_recipe, speech, tree_digests, write_checkpoint, write_speech
from voxtral_coreml.check.milrun import load_package
from voxtral_coreml.check.validate import find_package, validate_package
from voxtral_coreml.encoders.families import family_module
from voxtral_coreml.encoders.realtime.dims import STREAM_CHECK_FRAMES, RealtimeDims
from voxtral_coreml.encoders.realtime.family import speech_window
from voxtral_coreml.encoders.realtime.features import realtime_log_mel
from voxtral_coreml.encoders.realtime.model import build_offline_encoder, build_step_encoder, initial_state
from voxtral_coreml.encoders.realtime.reference import RealtimeReference, reference_config
from voxtral_coreml.encoders.realtime.rope import MAX_TOKENS, exact_angles, step_rope, step_tables
from voxtral_coreml.encoders.realtime.stream import Streamer, check_streaming, stream_mel
from voxtral_coreml.export.package_info import package_structure
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.export.torch_compress import apply_compressed
from voxtral_coreml.numerics.metrics import compare_embeddings, psnr_db
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import extract_audio_tower, load_extracted

DIMS = RealtimeDims(d_model=64, n_layers=2, n_heads=4, head_dim=32, ffn_dim=256, hidden_size=96, rope_theta=1e6)
SOURCE = {"kind": "synthetic", "family": "realtime", "seed": 5, "dims": {
    "d_model": 64, "n_layers": 2, "n_heads": 4, "head_dim": 32, "hidden_size": 96, "rope_theta": 1e6}}  # fmt: skip


def step_through(step, mel: torch.Tensor, k: int, start_token: int = 0) -> torch.Tensor:
    state = {n: t.float() for n, t in initial_state(step.dims).items()}
    rows = []
    with torch.inference_mode():
        for token in range(0, mel.shape[-1] // 8, k):
            chunk = mel[..., token * 8 : (token + k) * 8]
            out = step(chunk, torch.tensor([start_token + token], dtype=torch.int32), *state.values())
            rows.append(out[0].reshape(k, -1))
            state = dict(zip(state, out[1:], strict=True))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in DIMS.tensor_shapes().items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            out[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return out


@pytest.fixture(scope="module")
def mel_70s() -> torch.Tensor:
    """70.4 s of speech, as the pipeline's streaming check: 880 tokens, 3520 positions (the ring buffer wraps)."""
    return realtime_log_mel(speech(STREAM_CHECK_FRAMES / 100))[None]


@pytest.mark.parametrize("attention", ["fused_heads", "split_heads", "split_heads_chunked"])
def test_offline_module_matches_transformers(weights, attention: str) -> None:
    mel = speech_window(DIMS.mel_frames)
    expected = RealtimeReference(weights, DIMS).audio_embeddings(mel)
    with torch.inference_mode():
        got = build_offline_encoder(weights, DIMS, attention)(mel).reshape(expected.shape)
    assert psnr_db(expected, got) >= 100


@pytest.mark.parametrize("k", [1, 4])
def test_step_module_matches_transformers_streaming_past_the_window(weights, mel_70s, k: int) -> None:
    reference, mel = RealtimeReference(weights, DIMS), mel_70s
    expected = reference.streaming_embeddings(mel, k)
    assert expected.shape[0] * 4 > DIMS.cache_slots  # the ring buffer wraps
    assert psnr_db(reference.audio_embeddings(mel), expected) >= 100  # transformers agrees with itself
    assert psnr_db(expected, step_through(build_step_encoder(weights, DIMS, k), mel, k)) >= 100


def test_rope_tables_stay_exact_for_hours() -> None:
    positions = torch.tensor([0, 1, 2047, 2048, 30_000, 180_000, 4 * MAX_TOKENS - 1], dtype=torch.int32)
    low, high = step_tables(DIMS)
    cos, sin = step_rope(positions, low, high, 1, torch.float32)
    angles = exact_angles(positions, DIMS)
    per_channel = torch.cat([angles, angles], dim=1).t()[None, :, None, :]
    assert (cos.double() - per_channel.cos()).abs().max() < 1e-6
    assert (sin.double() - per_channel.sin()).abs().max() < 1e-6
    # fp16 angles, what the tables replace, are off by whole radians 10 minutes in (fp16 steps by 16 there)
    assert abs(torch.tensor(30_001.0).half().item() - 30_001) >= 1


def test_stream_ten_minutes_in_matches_transformers_positions(weights) -> None:
    """A state whose position says 10 minutes: once every layer's window holds only this clip's audio (2 windows
    for 2 layers), tokens match transformers given the same positions. transformers computes the angles in fp32
    (steps of 0.002 rad at 30000), the tables in float64: the gap is transformers' rounding."""
    start, tokens = 7500, 392
    mel = speech_window(tokens * 8)
    model = RealtimeReference(weights, DIMS).model.model
    with torch.inference_mode():
        positions = torch.arange(start * 4, (start + tokens) * 4)[None]
        hidden = model.audio_tower(input_features=mel, position_ids=positions).last_hidden_state
        expected = model.multi_modal_projector(hidden.reshape(1, -1, DIMS.projector_in))[0]
    got = step_through(build_step_encoder(weights, DIMS, 4), mel, 4, start)
    settled = 2 * DIMS.sliding_window // 4
    assert psnr_db(expected[settled:], got[settled:]) >= 60


def test_streamed_tokens_are_causal(weights) -> None:
    mel = speech_window(160)
    changed = mel.clone()
    changed[..., 80:] = torch.randn_like(changed[..., 80:])
    step = build_step_encoder(weights, DIMS, 1)
    before, after = step_through(step, mel, 1), step_through(step, changed, 1)
    assert torch.equal(before[:10], after[:10])  # tokens 0..9 heard frames 0..79 only
    assert not torch.allclose(before[10:], after[10:])


# Checkpoint layouts --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Realtime model written by transformers' own save_pretrained, and its audio weights."""
    torch.manual_seed(3)
    model = VoxtralRealtimeForConditionalGeneration(reference_config(DIMS))
    root = tmp_path_factory.mktemp("rt") / "checkpoint"
    model.save_pretrained(root)
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    return root, {k: v for k, v in state.items() if k.startswith(("audio_tower.", "multi_modal_projector."))}


def test_hf_checkpoint_from_save_pretrained_extracts_exactly(transformers_checkpoint, tmp_path: Path) -> None:
    root, expected = transformers_checkpoint
    summary = extract_audio_tower(root, tmp_path / "x")
    weights, dims, _ = load_extracted(tmp_path / "x")
    assert summary["family"] == "realtime" and dims == DIMS
    assert set(weights) == set(expected) - {
        "audio_tower.rotary_emb.inv_freq",
        "audio_tower.rotary_emb.original_inv_freq",
    }
    assert all(torch.equal(weights[n], expected[n]) for n in weights)


def test_mistral_layout_permutes_rope_rows_back(tmp_path: Path) -> None:
    family = family_module("realtime")
    for layout in ("hf", "mistral"):
        (tmp_path / layout).mkdir()
        family.write_synthetic(tmp_path / layout, {**SOURCE, "layout": layout}, "test")
        extract_audio_tower(tmp_path / layout, tmp_path / f"x-{layout}")
    hf, _, _ = load_extracted(tmp_path / "x-hf")
    mistral, _, _ = load_extracted(tmp_path / "x-mistral")
    assert all(torch.equal(hf[n], mistral[n]) for n in hf)
    raw = json.loads((tmp_path / "x-mistral" / "encoder.json").read_text())
    assert raw["layout"] == "mistral"


def test_family_mismatches_are_one_clear_error(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "v2507")
    with pytest.raises(VoxtralError, match=r"is a Voxtral 2507 .* checkpoint, not Voxtral Realtime"):
        extract_audio_tower(tmp_path / "v2507", tmp_path / "a", family="realtime")
    (tmp_path / "rt").mkdir()
    family_module("realtime").write_synthetic(tmp_path / "rt", SOURCE, "test")
    with pytest.raises(VoxtralError, match=r"is a Voxtral Realtime checkpoint, not Voxtral 2507"):
        extract_audio_tower(tmp_path / "rt", tmp_path / "b", family="2507")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mistral_names_without_params_json_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "renamed"
    root.mkdir()
    family_module("realtime").write_synthetic(root, {**SOURCE, "layout": "mistral"}, "test")
    (root / "params.json").rename(root / "config.json")  # HF-style tensors renamed to Mistral's: rows in HF order
    with pytest.raises(VoxtralError, match=r"need Mistral's params.json"):
        extract_audio_tower(root, tmp_path / "x")


def test_a_window_no_device_can_hold_is_refused() -> None:
    with pytest.raises(VoxtralError, match=r"sliding_window 200000: the streaming state would hold 48.8 GiB"):
        RealtimeDims(d_model=1280, n_layers=32, n_heads=32, head_dim=64, ffn_dim=5120, hidden_size=3072,
                     rope_theta=1e6, sliding_window=200_000)  # fmt: skip


# Packages ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt_extracted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rtx")
    (root / "checkpoint").mkdir()
    family_module("realtime").write_synthetic(root / "checkpoint", SOURCE, "test")
    extract_audio_tower(root / "checkpoint", root / "extracted")
    return root / "extracted"


PACKAGES = {  # name -> (recipe, streaming)
    "offline": ("fp16", None),
    "stateful-1": ("fp16", {"form": "stateful", "tokens_per_step": 1}),
    "stateful-4": ("fp16", {"form": "stateful", "tokens_per_step": 4}),
    "explicit-1": ("fp16", {"form": "explicit", "tokens_per_step": 1}),
    "explicit-4": ("fp16", {"form": "explicit", "tokens_per_step": 4}),
    "explicit-4-int8": ("int8", {"form": "explicit", "tokens_per_step": 4}),
    "multifunction-1": ("fp16", {"form": "multifunction", "tokens_per_step": 1}),
}


@pytest.fixture(scope="module")
def rt_packages(rt_extracted: Path, tmp_path_factory) -> dict[str, Path]:
    import yaml

    from conftest import REPO

    root, family = tmp_path_factory.mktemp("rtp"), family_module("realtime")
    out = {}
    for name, (recipe_name, streaming) in PACKAGES.items():
        recipe = Recipe.from_config(
            recipe_name, yaml.safe_load((REPO / "conf/recipe" / f"{recipe_name}.yaml").read_text())
        )
        package = root / name / family.package_name(None, streaming)
        family.convert_package(rt_extracted, package, recipe, model_name="demo-realtime", streaming=streaming, **BUILD)
        out[name] = package.parent
    return out


def test_offline_package_validates_against_transformers(rt_extracted: Path, rt_packages) -> None:
    reference, parity = family_module("realtime").compute_reference(rt_extracted, None, "fused_heads", 256)
    assert parity["psnr_db"] >= 100
    metrics, _ = validate_package(rt_packages["offline"], reference, 50)
    assert metrics["psnr_db"] >= 50 and metrics["output_shape"] == [1, 375, 96]


@pytest.mark.parametrize("name", ["stateful-1", "stateful-4", "explicit-1", "explicit-4"])
def test_streaming_packages_match_transformers_streaming(rt_extracted, rt_packages, mel_70s, name) -> None:
    weights, dims, _ = load_extracted(rt_extracted)
    package, manifest = find_package(rt_packages[name])
    info = manifest["streaming"]
    expected = RealtimeReference(weights, dims).streaming_embeddings(mel_70s, info["tokens_per_step"])
    streamed = stream_mel(load_package(package), info, mel_70s, str(package)).embeddings
    assert compare_embeddings(expected, streamed)["psnr_db"] >= 50
    offline_package, _ = find_package(rt_packages["offline"])
    window = load_package(offline_package).predict({"mel_spectrogram": mel_70s[..., :3000].numpy()})
    offline = torch.from_numpy(np.asarray(window["audio_embeddings"])).reshape(-1, 96)
    n = min(len(offline), len(streamed))
    assert psnr_db(offline[:n], streamed[:n]) >= 50  # the streamed first 30 s are the offline window's


def test_int8_streaming_package(rt_extracted, rt_packages, mel_70s) -> None:
    weights, dims, _ = load_extracted(rt_extracted)
    package, manifest = find_package(rt_packages["explicit-4-int8"])
    expected = RealtimeReference(weights, dims).streaming_embeddings(mel_70s, 4)
    streamed = stream_mel(load_package(package), manifest["streaming"], mel_70s, str(package)).embeddings
    assert psnr_db(expected, streamed) >= 40


def test_streaming_manifest_tells_the_app_what_it_needs(rt_packages) -> None:
    _, manifest = find_package(rt_packages["stateful-4"])
    info = manifest["streaming"]
    assert manifest["deployment_target"]["coreml"] == "iOS18"
    assert info["step_ms"] == 320 and info["mel_frames_per_step"] == 32
    assert [s["name"] for s in info["states"]] == ["conv1_context", "conv2_context", "key_cache", "value_cache"]
    assert info["states"][2]["shape"] == [2, 128, 1, 768]
    assert info["state_bytes"] == sum(s["bytes"] for s in info["states"]) == 2 * (128 * 2 + 64 + 2 * 2 * 128 * 768)
    _, explicit = find_package(rt_packages["explicit-1"])
    assert explicit["deployment_target"]["coreml"] == "iOS16"
    assert [i["name"] for i in explicit["inputs"]][:2] == ["mel_chunk", "position"]


def test_restarted_state_matches_a_fresh_package(rt_packages) -> None:
    package, manifest = find_package(rt_packages["stateful-1"])
    info, mel = manifest["streaming"], speech_window(80).numpy()
    model = load_package(package)
    streamer = Streamer(model, info, "s")
    first = [streamer.step(mel[..., i : i + 8]) for i in range(0, 80, 8)]
    restarted = Streamer(model, info, "s")  # a new state and position 0, as an app restarts a stream
    again = [restarted.step(mel[..., i : i + 8]) for i in range(0, 80, 8)]
    fresh = Streamer(load_package(package), info, "s")
    new = [fresh.step(mel[..., i : i + 8]) for i in range(0, 80, 8)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first, new, strict=True))


# Data-aware recipes (coremltools.optimize.torch) on the offline module: one per calibrating kind. The step shares the
# module's weights, so one calibration serves the offline window and every streaming form.
CALIBRATED = {  # recipe -> the constexpr ops its weights become
    "gptq4": {"constexpr_blockwise_shift_scale"},
    "skm6g": {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"},
}
STATEFUL_1 = {"form": "stateful", "tokens_per_step": 1}


def test_offline_stages_run_the_offline_forward(rt_extracted: Path) -> None:
    from voxtral_coreml.encoders.realtime.calibration import offline_stages

    weights, dims, _ = load_extracted(rt_extracted)
    model, mel = build_offline_encoder(weights, dims), speech_window(dims.mel_frames)
    with torch.inference_mode():
        assert torch.allclose(offline_stages(model)(mel), model(mel), atol=1e-5)


@pytest.fixture(scope="module", params=sorted(CALIBRATED))
def rt_calibrated(request, rt_extracted: Path, tmp_path_factory) -> dict:
    """A recipe calibrated twice (1 and 2 k-means workers), its offline package converted twice and its stateful
    step once, all from the first calibration."""
    name, root, family = request.param, tmp_path_factory.mktemp(f"rtc-{request.param}"), family_module("realtime")
    recipe = demo_recipe(name)
    states = [family.calibrate(rt_extracted, recipe, jobs=jobs)[0] for jobs in (1, 2)]
    packages = {}
    for label, streaming in (("offline", None), ("again", None), ("stateful-1", STATEFUL_1)):
        package = root / label / family.package_name(None, streaming)
        family.convert_package(
            rt_extracted, package, recipe, model_name="demo-realtime", streaming=streaming, calibrated=states[0],
            **BUILD,
        )  # fmt: skip
        packages[label] = package.parent
    return {"recipe": recipe, "states": states, "packages": packages}


def compressed_offline(rt_extracted: Path, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 module's, compressed module's) embeddings of the speech window."""
    weights, dims, _ = load_extracted(rt_extracted)
    mel, model = speech_window(dims.mel_frames), build_offline_encoder(weights, dims)
    with torch.inference_mode():
        expected = model(mel)
        apply_compressed(model, state)
        return expected, model(mel)


def test_realtime_calibration_is_deterministic_and_packages_byte_identical(rt_calibrated: dict) -> None:
    first, second = rt_calibrated["states"]
    assert first.keys() == second.keys() and any("._COREML_/weight/" in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    packages = rt_calibrated["packages"]
    assert tree_digests(packages["offline"]) == tree_digests(packages["again"])


def test_calibrated_offline_package_holds_the_compressed_weights(rt_extracted: Path, rt_calibrated: dict) -> None:
    recipe = rt_calibrated["recipe"]
    package, manifest = find_package(rt_calibrated["packages"]["offline"])
    ops = {k for k in package_structure(package)["ops"] if k.startswith("constexpr_")}
    assert ops == CALIBRATED[recipe.name]
    assert manifest["family"] == "realtime" and manifest["compression"]["kept_fp16"] == []
    assert manifest["compression"]["average_bits"] < 8
    expected, compressed = compressed_offline(rt_extracted, rt_calibrated["states"][0])
    got = load_package(package).predict({"mel_spectrogram": speech_window(3000).numpy()})["audio_embeddings"]
    got = torch.from_numpy(np.asarray(got)).reshape(expected.shape)
    assert psnr_db(compressed, got) >= 60  # the package is the compressed module, to fp16 rounding
    assert psnr_db(expected, got) >= recipe.psnr_gate_db  # and passes the recipe's gate


def test_calibrated_step_streams_its_offline_window(rt_extracted: Path, rt_calibrated: dict) -> None:
    package, manifest = find_package(rt_calibrated["packages"]["stateful-1"])
    ops = {k for k in package_structure(package)["ops"] if k.startswith("constexpr_")}
    assert ops == CALIBRATED[rt_calibrated["recipe"].name]
    _, compressed = compressed_offline(rt_extracted, rt_calibrated["states"][0])
    streamed = stream_mel(load_package(package), manifest["streaming"], speech_window(3000), str(package)).embeddings
    assert psnr_db(compressed.reshape(streamed.shape), streamed) >= 60


def test_data_aware_recipe_without_its_calibration_is_refused(rt_extracted: Path, tmp_path: Path) -> None:
    family = family_module("realtime")
    with pytest.raises(VoxtralError, match=r"recipe 'gptq4': compressed weights are for gptq, skm, ptp recipes only"):
        family.convert_package(
            rt_extracted, tmp_path / "x.mlpackage", demo_recipe("gptq4"), model_name="demo-realtime", **BUILD
        )
    assert not (tmp_path / "x.mlpackage").exists()


def test_streaming_bad_input_is_one_clear_error(rt_packages, extracted) -> None:
    package, manifest = find_package(rt_packages["explicit-1"])
    streamer = Streamer(load_package(package), manifest["streaming"], str(package))
    with pytest.raises(VoxtralError, match=r"a step takes 8 mel frames, got 12"):
        streamer.step(np.zeros((1, 128, 12), dtype=np.float32))
    streamer.position = MAX_TOKENS - 1 + 1
    with pytest.raises(VoxtralError, match=r"positions end at .* start a new stream"):
        streamer.step(np.zeros((1, 128, 8), dtype=np.float32))
    with pytest.raises(VoxtralError, match=r"not a streaming package"):
        check_streaming(Path("VoxtralEncoderMini.mlpackage"), {"package": "VoxtralEncoderMini.mlpackage"})


# The CLI on a checkpoint written by transformers -----------------------------------------------------------------


def transformers_embeddings_of_12_s(root: Path) -> torch.Tensor:
    """What `get_audio_features` of the checkpoint at root gives for speech(12): [150, H], one row per 80 ms (the clip
    padded with zeros to 150 tokens, as `encode` pads it)."""
    model = VoxtralRealtimeForConditionalGeneration.from_pretrained(root).eval()
    audio = np.zeros(150 * 1280, dtype=np.float32)
    audio[: 12 * 16000] = speech(12)
    with torch.inference_mode():
        return model.get_audio_features(realtime_log_mel(audio)[None]).pooler_output[0, :150]


def test_cli_converts_and_encodes_a_transformers_checkpoint(transformers_checkpoint, tmp_path: Path) -> None:
    root, _ = transformers_checkpoint
    clip = write_speech(tmp_path / "speech.wav", 12)
    for out, extra in (("offline", []), ("stream", ["--streaming", "stateful", "--tokens-per-step", "4"])):
        result = cli("convert", "--checkpoint", str(root), "--recipe", "fp16", "--out", str(tmp_path / out), *extra)
        assert result.returncode == 0, result.stderr
    expected = transformers_embeddings_of_12_s(root)
    offline = cli("encode", str(clip), "--package", str(tmp_path / "offline"), "--out", str(tmp_path / "o.npy"))
    assert offline.returncode == 0, offline.stderr
    streamed = cli("encode", str(clip), "--package", str(tmp_path / "stream"), "--stream", "--tokens-per-step", "4",
                   "--out", str(tmp_path / "s.npy"))  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert "step 38:" in streamed.stdout and "(38 steps of 320 ms)" in streamed.stdout
    for name in ("o.npy", "s.npy"):
        got = torch.from_numpy(np.load(tmp_path / name))
        assert got.shape == (150, 96) and psnr_db(expected, got) >= 50
    wrong = cli("encode", str(clip), "--package", str(tmp_path / "offline"), "--stream")
    assert wrong.returncode == 2 and "--stream needs a streaming package" in wrong.stderr


def test_cli_calibrates_and_streams_a_data_aware_recipe(transformers_checkpoint, tmp_path: Path) -> None:
    """convert --recipe gptq8 --streaming: the CLI calibrates the offline module (its recipe's speech) and the step
    gets the compressed weights; streamed, it matches transformers within the recipe's gate."""
    root, _ = transformers_checkpoint
    clip = write_speech(tmp_path / "speech.wav", 12)
    out = tmp_path / "gptq8"
    streaming = ("--streaming", "stateful")
    result = cli("convert", "--checkpoint", str(root), "--recipe", "gptq8", *streaming, "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "gptq8" and manifest["streaming"]["form"] == "stateful"
    assert set(manifest["compression"]["bits_per_op"].values()) == {8}
    streamed = cli("encode", str(clip), "--package", str(out), "--stream", "--out", str(tmp_path / "q.npy"))
    assert streamed.returncode == 0, streamed.stderr
    expected = transformers_embeddings_of_12_s(root)
    assert psnr_db(expected, torch.from_numpy(np.load(tmp_path / "q.npy"))) >= demo_recipe("gptq8").psnr_gate_db


def test_multifunction_package_holds_both_functions_with_weights_once(rt_packages) -> None:
    package, manifest = find_package(rt_packages["multifunction-1"])
    separate = sum(find_package(rt_packages[n])[1]["size_bytes"] for n in ("offline", "stateful-1"))
    assert manifest["size_bytes"] < separate
    assert manifest["deployment_target"]["coreml"] == "iOS18" and set(manifest["functions"]) == {"offline", "step"}
    mel = speech_window(3000)
    offline = load_package(package, function_name="offline").predict({"mel_spectrogram": mel.numpy()})
    alone = load_package(find_package(rt_packages["offline"])[0]).predict({"mel_spectrogram": mel.numpy()})
    assert psnr_db(torch.from_numpy(alone["audio_embeddings"]), torch.from_numpy(offline["audio_embeddings"])) >= 60
    step = Streamer(load_package(package), manifest["streaming"], str(package))  # the default function: the step
    first = np.concatenate([step.step(mel[..., i : i + 8].numpy()) for i in range(0, 80, 8)])
    assert psnr_db(torch.from_numpy(offline["audio_embeddings"][0, :10]), torch.from_numpy(first)) >= 50
