"""Checkpoint layouts: the same weights give the same canonical tensors from HF, Mistral and MLX checkpoints,
MLX quantized tensors dequantize exactly as MLX does, and bad layouts are named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from layout_writers import MLXQuant, canonical_weights, mx_to_torch, write_mistral_checkpoint, write_mlx_checkpoint
from safetensors.torch import load_file, save_file

import voxtral_coreml.sources.layouts.mlx as mlx_layout
from conftest import DEMO_DIMS, DEMO_LM, write_checkpoint
from voxtral_coreml.encoders.dims import POSITIONS_KEY, WEIGHTS_FILE, EncoderDims, canonical_tensor_shapes
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import extract_audio_tower
from voxtral_coreml.sources.layouts import is_encoder_tensor_any_layout, mlx_quant, open_layout
from voxtral_coreml.sources.layouts.mistral import canonical_name, mistral_name
from voxtral_coreml.sources.layouts.mlx_quant import AFFINE_BITS, GROUP_SIZES, QuantParams, dequantize
from voxtral_coreml.sources.safetensors_io import read_header, read_tensor

# Group size 128 needs every quantized row (d_model, ffn, H, 4 * d_model) to be a multiple of 128.
QDIMS = EncoderDims(d_model=128, n_layers=1, n_heads=4, ffn_dim=256, hidden_size=128)
TORCH_DTYPES = {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16, mx.float32: torch.float32}


def extracted_tensors(out: Path) -> dict[str, torch.Tensor]:
    path = out / WEIGHTS_FILE
    return {name: read_tensor(path, info) for name, info in read_header(path).items()}


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


def assert_nothing_written(tmp_path: Path, out: Path, inputs: set[str]) -> None:
    assert not out.exists()
    assert {p.name for p in tmp_path.iterdir()} == inputs  # no staging leftovers


# ---------------------------------------------------------------- names


def test_mistral_names_are_the_published_ones() -> None:
    # As in transformers' convert_voxtral_weights_to_hf.py STATE_DICT_MAPPING and vLLM's Voxtral loader.
    layer = "whisper_encoder.transformer.layers.7."
    published = {
        "whisper_encoder.conv_layers.0.weight": "audio_tower.conv1.weight",
        "whisper_encoder.conv_layers.1.bias": "audio_tower.conv2.bias",
        f"{layer}attention.wq.bias": "audio_tower.layers.7.self_attn.q_proj.bias",
        f"{layer}attention.wk.weight": "audio_tower.layers.7.self_attn.k_proj.weight",
        f"{layer}attention.wv.weight": "audio_tower.layers.7.self_attn.v_proj.weight",
        f"{layer}attention.wo.bias": "audio_tower.layers.7.self_attn.out_proj.bias",
        f"{layer}attention_norm.weight": "audio_tower.layers.7.self_attn_layer_norm.weight",
        f"{layer}feed_forward.w1.weight": "audio_tower.layers.7.fc1.weight",
        f"{layer}feed_forward.w2.bias": "audio_tower.layers.7.fc2.bias",
        f"{layer}ffn_norm.bias": "audio_tower.layers.7.final_layer_norm.bias",
        "whisper_encoder.transformer.norm.weight": "audio_tower.layer_norm.weight",
        "audio_language_projection.0.weight": "multi_modal_projector.linear_1.weight",
        "audio_language_projection.2.weight": "multi_modal_projector.linear_2.weight",
    }  # fmt: skip
    for mistral, canonical in published.items():
        assert canonical_name(f"mm_whisper_embeddings.{mistral}") == canonical
        assert mistral_name(canonical) == f"mm_whisper_embeddings.{mistral}"
    every = canonical_tensor_shapes(EncoderDims(64, 12, 4, 256, 96))
    assert all(canonical_name(mistral_name(name)) == name for name in every)
    assert canonical_name("layers.0.attention.wq.weight") is None  # the language model's


def test_the_fetcher_skips_the_language_model_even_under_the_audio_prefix() -> None:
    assert is_encoder_tensor_any_layout("mm_whisper_embeddings.audio_language_projection.0.weight")
    assert is_encoder_tensor_any_layout("audio_tower.layers.0.fc1.scales")
    assert not is_encoder_tensor_any_layout("mm_whisper_embeddings.tok_embeddings.weight")
    assert not is_encoder_tensor_any_layout("language_model.model.embed_tokens.weight")


# ---------------------------------------------------------------- same weights, every layout


def test_same_weights_give_identical_canonical_tensors_and_hash_in_every_layout(tmp_path: Path) -> None:
    checkpoints = {
        "hf": write_checkpoint(tmp_path / "hf"),
        "mistral": write_mistral_checkpoint(tmp_path / "mistral", DEMO_DIMS, DEMO_LM),
        "mlx": tmp_path / "mlx",
    }
    write_mlx_checkpoint(checkpoints["mlx"], DEMO_DIMS, DEMO_LM)
    summaries = {layout: extract_audio_tower(root, tmp_path / f"out-{layout}") for layout, root in checkpoints.items()}

    assert {s["layout"] for s in summaries.values()} == set(checkpoints)  # each detected as what it is
    assert len({s["weights_sha256"] for s in summaries.values()}) == 1
    assert all(s["positions"] == "sinusoid" for s in summaries.values())
    expected = {n: t for n, t in canonical_weights(DEMO_DIMS, seed=1).items() if n != POSITIONS_KEY}
    for layout in checkpoints:
        assert_bit_identical(extracted_tensors(tmp_path / f"out-{layout}"), expected)


def test_mistral_tensors_as_the_hub_fetcher_writes_them(tmp_path: Path) -> None:
    root = write_mistral_checkpoint(tmp_path / "fetched", DEMO_DIMS, DEMO_LM, weights_file="model.safetensors")
    assert open_layout(root).name == "mistral"
    assert extract_audio_tower(root, tmp_path / "out")["dims"] == DEMO_DIMS.to_json()


@pytest.mark.parametrize(
    ("layout", "extras"),
    [
        ("mlx", ("params.json",)),  # mlx.voxtral copies params.json into its conversions
        ("hf", ("params.json",)),  # what the Hub fetcher writes for Mistral's repos, which hold both layouts
        ("hf", ("params.json", "consolidated.safetensors")),  # a full clone of such a repo
    ],
)
def test_detection_goes_by_tensors_not_file_names(tmp_path: Path, layout: str, extras: tuple[str, ...]) -> None:
    root = tmp_path / "ckpt"
    if layout == "mlx":
        write_mlx_checkpoint(root, DEMO_DIMS, DEMO_LM)
    else:
        write_checkpoint(root)
    write_mistral_checkpoint(tmp_path / "mistral", DEMO_DIMS, DEMO_LM)
    for extra in extras:
        (root / extra).write_bytes((tmp_path / "mistral" / extra).read_bytes())
    assert open_layout(root).name == layout


def test_layout_override_and_unknown_names(tmp_path: Path) -> None:
    root = write_mistral_checkpoint(tmp_path / "m", DEMO_DIMS, DEMO_LM)
    assert open_layout(root, "mistral").name == "mistral"
    with pytest.raises(
        VoxtralError, match=r"^unknown checkpoint layout 'gguf'; choose auto or one of hf, mlx, mistral$"
    ):
        open_layout(root, "gguf")
    (root / "params.json").unlink()
    with pytest.raises(VoxtralError, match=r"no known checkpoint layout \(expected audio_tower"):
        open_layout(root)


# ---------------------------------------------------------------- MLX quantization


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_dequantize_is_mlx_dequantize_for_every_bits_and_group_size(dtype: mx.Dtype) -> None:
    w = (mx.random.normal((8, 384), key=mx.random.key(0)) * 0.05).astype(dtype)
    for bits in AFFINE_BITS:
        for group_size in GROUP_SIZES:
            packed, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
            ours = dequantize(
                torch.from_numpy(np.array(packed)),
                mx_to_torch(scales, TORCH_DTYPES[dtype]),
                mx_to_torch(biases, TORCH_DTYPES[dtype]),
                QuantParams(bits, group_size),
            )
            theirs = mx_to_torch(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits), ours.dtype)
            assert torch.equal(ours, theirs), (bits, group_size)


def test_dequantize_in_row_blocks_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    packed, scales, biases = mx.quantize(mx.random.normal((10, 256), key=mx.random.key(1)), group_size=32, bits=5)
    args = (torch.from_numpy(np.array(packed)), mx_to_torch(scales, torch.float32), mx_to_torch(biases, torch.float32))
    whole = dequantize(*args, QuantParams(5, 32))
    monkeypatch.setattr(mlx_quant, "CHUNK_VALUES", 3 * 256)  # 3 rows at a time, the last block short
    assert torch.equal(dequantize(*args, QuantParams(5, 32)), whole)


QUANTIZED = {
    "4-bit g64, like mlx.voxtral's uniform mode": (MLXQuant(4, 64), torch.bfloat16),
    "3-bit g128, values straddling words": (MLXQuant(3, 128), torch.bfloat16),
    "mixed: LM 2-bit, audio 6-bit g32, projector 8-bit g128": (
        MLXQuant(2, 64, overrides={
            **{f"audio_tower.layers.0.{m}": (6, 32) for m in ("self_attn.q_proj", "self_attn.k_proj", "fc1", "fc2")},
            "multi_modal_projector.linear_1": (8, 128),
            "multi_modal_projector.linear_2": (8, 128),
        }),
        torch.bfloat16,
    ),
    "5-bit g32, float16, positions quantized too": (MLXQuant(5, 32, positions=True), torch.float16),
}  # fmt: skip


@pytest.mark.parametrize("case", QUANTIZED)
def test_quantized_mlx_extracts_to_mlx_dequantize(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    quant, dtype = QUANTIZED[case]
    root = tmp_path / "mlx"
    expected = write_mlx_checkpoint(root, QDIMS, DEMO_LM, dtype=dtype, quant=quant)
    read: list[str] = []
    real_read = mlx_layout.read_tensor
    monkeypatch.setattr(mlx_layout, "read_tensor", lambda p, info: read.append(info.name) or real_read(p, info))
    summary = extract_audio_tower(root, tmp_path / "out")

    assert summary["layout"] == "mlx"
    assert (summary["positions"] == "stored") == quant.positions  # quantized sinusoids are sinusoids no more
    got = extracted_tensors(tmp_path / "out")
    if summary["positions"] == "sinusoid":
        expected.pop(POSITIONS_KEY)
    assert_bit_identical(got, expected)
    assert got["audio_tower.layers.0.fc1.weight"].dtype == dtype  # dequantized to the scales' dtype
    assert read and not any(name.startswith("language_model.") for name in read)


# ---------------------------------------------------------------- bad input


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _whisper_args(params: dict) -> dict:
    return params["multimodal"]["whisper_model_args"]


def _encoder_args(params: dict) -> dict:
    return _whisper_args(params)["encoder_args"]


def _drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path)


def _add_tensor(path: Path, name: str) -> None:
    save_file({**load_file(path), name: torch.zeros(4)}, path)


W2_BIAS = "mm_whisper_embeddings.whisper_encoder.transformer.layers.1.feed_forward.w2.bias"
BAD_MISTRAL = {
    "params.json without encoder args": (
        lambda r: _edit_json(r / "params.json", lambda p: _whisper_args(p).pop("encoder_args")),
        r"params\.json: missing 'multimodal\.whisper_model_args\.encoder_args' \(expected an object\)$",
    ),
    "encoder args without n_heads": (
        lambda r: _edit_json(r / "params.json", lambda p: _encoder_args(p).pop("n_heads")),
        r"params\.json: multimodal\.whisper_model_args\.encoder_args: missing 'n_heads'$",
    ),
    "downsample factor 2": (
        lambda r: _edit_json(
            r / "params.json", lambda p: _whisper_args(p)["downsample_args"].update(downsample_factor=2)
        ),
        r"params\.json: downsample_factor is 2; Voxtral's projector stacks 4 frames$",
    ),
    "causal (Realtime) encoder": (
        lambda r: _edit_json(r / "params.json", lambda p: _encoder_args(p).update(causal=True)),
        r"describe a causal \(Voxtral Realtime\) encoder, not supported$",
    ),
    "a tensor missing": (
        lambda r: _drop_tensor(r / "consolidated.safetensors", W2_BIAS),
        rf"tensor '{W2_BIAS}' \(audio_tower\.layers\.1\.fc2\.bias\) is missing$",
    ),
    "an audio tensor with no canonical name": (
        lambda r: _add_tensor(r / "consolidated.safetensors", "mm_whisper_embeddings.whisper_encoder.extra.bias"),
        r"consolidated\.safetensors: tensor 'mm_whisper_embeddings\.whisper_encoder\.extra\.bias' is not part of",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_MISTRAL)
def test_bad_mistral_checkpoints_get_one_line_and_no_output(tmp_path: Path, case: str) -> None:
    damage, message = BAD_MISTRAL[case]
    root = write_mistral_checkpoint(tmp_path / "mistral", DEMO_DIMS, DEMO_LM)
    damage(root)
    with pytest.raises(VoxtralError, match=message) as err:
        extract_audio_tower(root, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert_nothing_written(tmp_path, tmp_path / "out", {"mistral"})


def _quantization(edit):
    """Edit config.json's quantization and its alias alike, as mlx-lm writes them."""
    return lambda r: _edit_json(r / "config.json", lambda c: [edit(c[key]) for key in mlx_quant.CONFIG_KEYS])


BAD_MLX = {
    "bits contradict the packed shapes": (
        _quantization(lambda q: q.update(bits=8)),
        r"config\.json: quantization gives 'audio_tower\.layers\.0\.fc1' 8 bits in groups of 64, but its 8 packed "
        r"words and 2 groups per row hold 2 bits in groups of 64 for 128 inputs$",
    ),
    "group size contradicts the scales": (
        _quantization(lambda q: q.update(group_size=32)),
        r"quantization gives 'audio_tower\.layers\.0\.fc1' 2 bits in groups of 32, but its 8 packed words and 2 "
        r"groups per row hold 2 bits in groups of 64 for 128 inputs$",
    ),
    "a per-layer override contradicts its layer": (
        _quantization(lambda q: q.update({"audio_tower.layers.0.fc2": {"bits": 4, "group_size": 64}})),
        r"gives 'audio_tower\.layers\.0\.fc2' 4 bits in groups of 64, but .* hold 2 bits in groups of 64 for 256",
    ),
    "a quantized layer the config calls unquantized": (
        _quantization(lambda q: q.update({"audio_tower.layers.0.fc2": False})),
        r"config\.json: quantization\['audio_tower\.layers\.0\.fc2'\] is false, but 'audio_tower\.layers\.0\.fc2' "
        r"is stored quantized$",
    ),
    "no quantization in config.json": (
        lambda r: _edit_json(r / "config.json", lambda c: [c.pop(key) for key in mlx_quant.CONFIG_KEYS]),
        r"config\.json: has no MLX quantization, but 'audio_tower\.layers\.0\.fc1' is stored quantized$",
    ),
    "unsupported mode": (
        _quantization(lambda q: q.update(mode="mxfp4")),
        r"config\.json: quantization mode 'mxfp4' is not supported \(only MLX's 'affine'\)$",
    ),
    "unsupported bits": (
        _quantization(lambda q: q.update(bits=7)),
        r"config\.json: quantization: 'bits' is 7, expected one of 1, 2, 3, 4, 5, 6, 8$",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_MLX)
def test_bad_mlx_quantization_gets_one_line_and_no_output(tmp_path: Path, case: str) -> None:
    damage, message = BAD_MLX[case]
    root = tmp_path / "mlx"
    write_mlx_checkpoint(root, QDIMS, DEMO_LM, quant=MLXQuant(2, 64))
    damage(root)
    with pytest.raises(VoxtralError, match=message) as err:
        extract_audio_tower(root, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert_nothing_written(tmp_path, tmp_path / "out", {"mlx"})


def test_mlx_conv_weight_in_pytorch_orientation_is_named(tmp_path: Path) -> None:
    root = tmp_path / "mlx"
    write_mlx_checkpoint(root, DEMO_DIMS, DEMO_LM, quant=MLXQuant(4, 64))  # quantized: detected as MLX regardless
    tensors = mx.load(str(root / "model.safetensors"))
    tensors["audio_tower.conv2.weight"] = tensors["audio_tower.conv2.weight"].transpose(0, 2, 1)
    mx.save_safetensors(str(root / "model.safetensors"), tensors)
    with pytest.raises(VoxtralError, match=r"'audio_tower\.conv2\.weight' is \[64, 64, 3\]; MLX stores conv weights"):
        extract_audio_tower(root, tmp_path / "out")


def test_quantization_config_alone_is_read_as_the_quantization(tmp_path: Path) -> None:
    # mlx-lm writes both keys; some conversions keep only the HF-tree alias.
    root = tmp_path / "mlx"
    expected = write_mlx_checkpoint(root, QDIMS, DEMO_LM, quant=MLXQuant(4, 32))
    _edit_json(root / "config.json", lambda c: c.pop("quantization"))
    extract_audio_tower(root, tmp_path / "out")
    expected.pop(POSITIONS_KEY)
    assert_bit_identical(extracted_tensors(tmp_path / "out"), expected)
