"""Core AI assets: recipes mapped onto coreai-opt, reproducible bytes, any module (states too), and the same model
run by Apple's Core AI runtime, by this project's MIL runtime (as a Core ML package) and by transformers."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import DEMO_DIMS, REPO, cli, speech, tree_digests, write_speech
from voxtral_coreml.check.coreai_backend import load_asset
from voxtral_coreml.cli import recipe_config
from voxtral_coreml.encode import encode_audio
from voxtral_coreml.encoders.families import family_module
from voxtral_coreml.encoders.model import whisper_sinusoids
from voxtral_coreml.encoders.realtime.features import realtime_log_mel
from voxtral_coreml.encoders.realtime.reference import RealtimeReference
from voxtral_coreml.encoders.realtime.stream import stream_mel
from voxtral_coreml.encoders.reference import TransformersReference, processor_features, reference_config
from voxtral_coreml.export.coreai import compression_settings, export_asset
from voxtral_coreml.export.formats import FORMATS
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.features.logmel import load_audio
from voxtral_coreml.numerics.metrics import compare_embeddings
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.params import compose_params
from voxtral_coreml.sources.extract import extract_audio_tower, load_extracted

DEMO_COREAI_RECIPES = ["fp16", "int8", "pal4g"]  # conf/config.yaml's pipeline.coreai.recipes (a test checks)


def recipe(name: str) -> Recipe:
    return Recipe.from_config(name, recipe_config(name))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fp16", {"pass": None, "weights": "float16"}),
        ("int8", {"pass": "quantize_weights", "dtype": "int8", "qscheme": "SYMMETRIC", "granularity": "per_channel"}),
        ("int4b", {"pass": "quantize_weights", "dtype": "int4", "granularity": "per_block", "block_size": 32}),
        ("pal6", {"pass": "palettize_weights", "n_bits": 6, "granularity": "per_tensor", "lut_dtype": None}),
        ("pal4g", {"pass": "palettize_weights", "n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}),
    ],
)
def test_recipes_map_onto_coreai_opt(name: str, expected: dict) -> None:
    settings = compression_settings(recipe(name))
    assert expected.items() <= settings.items()
    if settings["pass"] is not None:
        assert settings["weight_num_threshold"] == recipe(name).params["weight_threshold"]
    if settings["pass"] == "palettize_weights":
        assert settings["num_kmeans_workers"] == 1  # grouped k-means deadlocks with coreai-opt's default of 4


def test_a_recipe_without_a_core_ai_equivalent_is_refused_when_composed(tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match="recipe 'mixed': kind mixed has no Core AI equivalent") as err:
        compose_params(tmp_path / "params.yaml", REPO / "conf", ["pipeline.coreai.recipes=[fp16,mixed]"])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "params.yaml").exists()
    with pytest.raises(VoxtralError, match=r"pipeline.coreai.recipes: unknown recipe 'int3'"):
        compose_params(tmp_path / "params.yaml", REPO / "conf", ["pipeline.coreai.recipes=[int3]"])
    with pytest.raises(VoxtralError, match=r"pipeline.coreai.models: 'nano' is not in pipeline.models"):
        compose_params(tmp_path / "params.yaml", REPO / "conf", ["pipeline.coreai.models=[nano]"])


def test_the_demo_builds_the_core_ai_recipes_these_tests_check() -> None:
    coreai = yaml.safe_load((REPO / "params.yaml").read_text())["pipeline"]["coreai"]
    assert coreai == {"models": ["demo-mini", "demo-small", "demo-realtime"], "recipes": DEMO_COREAI_RECIPES}


def test_convert_refuses_mixed_before_any_work(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "E.aimodel"
    args = ["--checkpoint", str(checkpoint), "--recipe", "mixed", "--format", "coreai", "--out", str(out)]
    result = cli("convert", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: recipe 'mixed': kind mixed has no Core AI equivalent")
    assert not out.parent.exists()
    result = cli("convert", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out))
    assert result.returncode == 2 and "argument --format: invalid choice: 'onnx'" in result.stderr


def test_an_asset_is_byte_identical_across_processes_and_describes_itself(checkpoint: Path, tmp_path: Path) -> None:
    """Two conversions in two processes (k-means included): coreai-torch's per-process blob names and the
    creation date would differ without canonicalization."""
    folders = []
    for run_id in ("a", "b"):
        out = tmp_path / run_id
        args = ["--checkpoint", str(checkpoint), "--recipe", "pal4g", "--format", "coreai", "--variant", "Mini"]
        args += ["--out", str(out)]
        result = cli("convert", *args)
        assert result.returncode == 0, result.stderr
        folders.append(out)
    first, second = (tree_digests(folder) for folder in folders)
    assert first == second
    assert set(first) == {"manifest.json", *(f"VoxtralEncoderMini.aimodel/{f}" for f in ("main.hash", "main.mlirb",
                                                                                         "metadata.json"))}  # fmt: skip
    metadata = json.loads((folders[0] / "VoxtralEncoderMini.aimodel" / "metadata.json").read_text())
    assert "creationDate" not in metadata
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["format"] == "coreai" and manifest["deployment_target"] == {"coreai": "v27", "ios": "27.0",
                                                                                "macos": "27.0"}  # fmt: skip
    assert manifest["compression"]["pass"] == "palettize_weights"
    result = cli("inspect", str(folders[0] / "VoxtralEncoderMini.aimodel"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  functions: main (Voxtral Mini audio encoder + projector (pal4g))" in lines
    assert "  mel_spectrogram: float32 [1, 128, 3000]" in lines and "  audio_embeddings: float32 [1, 375, 96]" in lines
    assert "  minimum OS: iOS / macOS 27.0  producer: coreai-core 1.0.0b3" in lines
    assert any(line.startswith("  recipe: pal4g (") and "n_bits 4" in line for line in lines)
    assert re.search(r"  weights by storage type: UInt4 \d+, Float16 \d+", result.stdout)  # 4-bit indices
    assert re.search(r"  ops: \d+ \(.*lut_to_dense 16", result.stdout)  # one LUT lookup per conv weight


class RunningSum(nn.Module):
    """A streaming step in miniature: a buffer mutated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros(1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.total.add_(x)
        return self.total * 2


def test_any_module_exports_and_a_mutated_buffer_becomes_a_state(tmp_path: Path) -> None:
    from coreai.runtime import NDArray

    path = tmp_path / "sum.aimodel"
    export_asset(RunningSum().eval(), (torch.zeros(1, 4),), ["x"], ["y"], path, state_names=["total"])

    async def three_steps() -> list[np.ndarray]:
        async with load_asset(path).executable() as model:
            step = model.load_function("main")
            state = NDArray(np.zeros((1, 4), np.float32))  # the runtime updates it in place
            return [(await step({"x": NDArray(np.ones((1, 4), np.float32))}, state={"total": state}))["y"].numpy()
                    for _ in range(3)]  # fmt: skip

    outputs = asyncio.run(three_steps())
    assert [float(y[0, 0]) for y in outputs] == [2.0, 4.0, 6.0]
    with pytest.raises(VoxtralError, match=r"sum.mlpackage: a Core AI asset must end in .aimodel"):
        export_asset(RunningSum(), (torch.zeros(1, 4),), ["x"], ["y"], tmp_path / "sum.mlpackage")


@pytest.fixture(scope="module")
def speech_and_transformers(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """10 s of speech and transformers' get_audio_features for demo-mini on it (one 30 s window)."""
    audio = write_speech(tmp_path_factory.mktemp("coreai") / "speech-10s.wav", 10)
    weights, dims, _ = load_extracted(demo_repo / "artifacts" / "extracted" / "demo-mini")
    return audio, TransformersReference(weights, dims).audio_embeddings(processor_features(load_audio(audio)))


@pytest.mark.parametrize("name", DEMO_COREAI_RECIPES)
def test_core_ai_and_core_ml_agree_with_each_other_and_with_transformers(
    name: str, demo_repo: Path, speech_and_transformers: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    """The same module and recipe: as a Core ML package run by the MIL runtime, and as a Core AI asset run by
    Apple's runtime through `voxtral-coreml encode` (which names the runtime)."""
    audio, expected = speech_and_transformers
    package = demo_repo / "artifacts" / "packages" / "demo-mini" / name
    asset = demo_repo / "artifacts" / "coreai" / "demo-mini" / name / "VoxtralEncoderMini.aimodel"
    coreml = encode_audio(audio, package, backend="mil", progress=False).embeddings
    out = tmp_path / "coreai.npy"
    result = cli("encode", str(audio), "--package", str(asset), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert re.search(r"coreai \(coreai-core's CPU runtime \(Linux\)\): load [\d.]+ s", result.stdout)
    coreai = torch.from_numpy(np.load(out))
    gate = recipe(name).psnr_gate_db
    pairs = {
        "Core ML (MIL runtime) vs transformers": compare_embeddings(expected, coreml),
        "Core AI (Apple's runtime) vs transformers": compare_embeddings(expected, coreai),
        "Core AI vs Core ML": compare_embeddings(coreml, coreai),
    }
    print(f"{name}: {pairs} (gate {gate} dB)")
    assert all(m["psnr_db"] >= gate for m in pairs.values()), pairs


def test_a_checkpoint_written_by_transformers_converts_and_encodes_70_s(tmp_path: Path) -> None:
    """transformers' own save_pretrained (demo dims), `convert --format coreai`, then `encode` of 70 s of speech (3
    windows) by Apple's runtime against that model's get_audio_features."""
    from transformers import VoxtralForConditionalGeneration

    torch.manual_seed(2)
    model = VoxtralForConditionalGeneration(reference_config(DEMO_DIMS)).eval()
    positions = model.model.audio_tower.embed_positions.weight
    with torch.no_grad():  # a random init holds no sinusoids; a real checkpoint does
        positions.copy_(whisper_sinusoids(*positions.shape))
    model.save_pretrained(tmp_path / "checkpoint")
    asset = tmp_path / "asset" / "VoxtralEncoderMini.aimodel"  # the name says Mini (width 96 does not)
    result = cli("convert", "--checkpoint", str(tmp_path / "checkpoint"), "--format", "coreai", "--out", str(asset))
    assert result.returncode == 0, result.stderr
    audio, out = write_speech(tmp_path / "speech-70s.wav", 70), tmp_path / "embeddings.npy"
    result = cli("encode", str(audio), "--package", str(asset), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "(3 windows of 30 s)" in result.stdout and "coreai (coreai-core's CPU runtime" in result.stdout
    with torch.inference_mode():
        expected = model.get_audio_features(processor_features(load_audio(audio))).pooler_output
    metrics = compare_embeddings(expected, torch.from_numpy(np.load(out)))
    print(f"transformers checkpoint, Core AI fp16, 70 s: {metrics}")
    assert expected.shape == (3 * 375, DEMO_DIMS.hidden_size) and metrics["psnr_db"] >= 45


def test_an_asset_runs_only_on_apples_runtime(demo_repo: Path) -> None:
    from voxtral_coreml.check.validate import load_reference, validate_package

    reference = load_reference(demo_repo / "artifacts" / "reference" / "demo-mini" / "reference.safetensors")
    with pytest.raises(VoxtralError, match=r"a Core AI asset runs on the coreai backend \(or auto\), not 'mil'"):
        validate_package(demo_repo / "artifacts" / "coreai" / "demo-mini" / "fp16", reference, 50.0, backend="mil")


# Voxtral Realtime ----------------------------------------------------------------------------------------------

REALTIME_MEL_FRAMES = 7040  # 70.4 s of speech: 880 tokens, past the 750-position window (the ring buffer wraps)


@pytest.fixture(scope="module")
def realtime_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-realtime's synthetic checkpoint (conf/model/demo-realtime.yaml's source), in transformers' layout."""
    root = tmp_path_factory.mktemp("coreai-realtime") / "checkpoint"
    root.mkdir()
    source = yaml.safe_load((REPO / "conf" / "model" / "demo-realtime.yaml").read_text())["source"]
    family_module("realtime").write_synthetic(root, source, "demo-realtime")
    return root


def test_the_realtime_step_as_a_stateful_core_ai_function_matches_transformers_streaming(
    realtime_checkpoint: Path, tmp_path: Path
) -> None:
    """The step's contexts and key/value ring buffers are Core AI states that Apple's runtime keeps between calls;
    70 s of speech, 4 tokens per call, against transformers' own streaming (float64)."""
    out = tmp_path / "asset"
    args = ["--checkpoint", str(realtime_checkpoint), "--format", "coreai", "--streaming", "stateful"]
    result = cli("convert", *args, "--tokens-per-step", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    asset = out / "VoxtralRealtimeStreaming.aimodel"
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["streaming"]
    assert manifest["family"] == "realtime" and info["form"] == "stateful" and info["tokens_per_step"] == 4
    extract_audio_tower(realtime_checkpoint, tmp_path / "extracted")
    weights, dims, _ = load_extracted(tmp_path / "extracted")
    mel = realtime_log_mel(speech(REALTIME_MEL_FRAMES / 100))[None]
    exact = {name: w.double() for name, w in weights.items()}
    expected = RealtimeReference(exact, dims).streaming_embeddings(mel.double(), 4).float()
    with FORMATS["coreai"].step_model("coreai", asset, info) as step:
        streamed = stream_mel(step, info, mel, str(asset)).embeddings
    metrics = compare_embeddings(expected, streamed)
    print(f"Realtime stateful step (Core AI, fp16, k=4) over 70 s vs transformers' streaming: {metrics}")
    assert streamed.shape == (880, dims.hidden_size) and metrics["psnr_db"] >= 50
    result = cli("encode", str(write_speech(tmp_path / "speech-2s.wav", 2)), "--package", str(asset), "--stream")
    assert result.returncode == 0, result.stderr
    assert "audio_embeddings [25, 96] float32" in result.stdout and "coreai (coreai-core's CPU runtime" in result.stdout


def test_core_ai_streams_only_in_the_stateful_form(realtime_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "VoxtralRealtimeStreaming.aimodel"
    args = ["--checkpoint", str(realtime_checkpoint), "--format", "coreai", "--streaming", "explicit"]
    result = cli("convert", *args, "--out", str(out))
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --streaming explicit: --format coreai streams in the form stateful"
    )
    assert not out.parent.exists()
