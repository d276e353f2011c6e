"""The ANE module computes what transformers computes, and the checks catch the original scripts' bugs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import voxtral_coreml.encoders.model as model_module
from conftest import DEMO_DIMS
from voxtral_coreml.encoders.attention import ATTENTION_CORES
from voxtral_coreml.encoders.dims import EncoderDims, canonical_tensor_shapes
from voxtral_coreml.encoders.model import build_ane_encoder, projector_conv_weight
from voxtral_coreml.encoders.reference import TransformersReference, compute_reference
from voxtral_coreml.features.logmel import speech_mel
from voxtral_coreml.numerics.metrics import compare_embeddings
from voxtral_coreml.sources.extract import load_extracted
from voxtral_coreml.sources.synthetic import audio_tensor

PARITY_GATE_DB = 100.0


def synthetic_weights(dims: EncoderDims, seed: int = 3) -> dict[str, torch.Tensor]:
    # bf16-rounded like a real checkpoint, held in fp32 for the fp32 comparison.
    return {n: audio_tensor(n, s, seed).to(torch.bfloat16).float() for n, s in canonical_tensor_shapes(dims).items()}


def parity(
    weights: dict[str, torch.Tensor], dims: EncoderDims, attention: str = "split_heads", query_chunk: int = 7
) -> dict:
    mel = speech_mel()
    expected = TransformersReference(weights, dims).audio_embeddings(mel)
    with torch.inference_mode():
        got = build_ane_encoder(weights, dims, attention, query_chunk)(mel)
    assert got.shape == (1, dims.n_embeddings, dims.hidden_size)
    return compare_embeddings(expected, got.reshape(expected.shape))


@pytest.mark.parametrize(
    ("attention", "query_chunk"), [*((core, 7) for core in ATTENTION_CORES), ("split_heads_chunked", 400)]
)
def test_ane_module_matches_transformers_at_demo_dims(attention: str, query_chunk: int) -> None:
    # Neither 7 nor 400 divides 1500: the chunked core must keep the tail (ceil, not floor). 7 gives more chunks
    # than the demo's 4 heads (cut heads first), 400 fewer (cut queries first).
    assert parity(synthetic_weights(DEMO_DIMS), DEMO_DIMS, attention, query_chunk)["psnr_db"] >= PARITY_GATE_DB


def test_ane_module_matches_transformers_at_full_dims() -> None:
    dims = EncoderDims(d_model=1280, n_layers=32, n_heads=20, ffn_dim=5120, hidden_size=3072)
    result = parity(synthetic_weights(dims), dims)
    assert result["psnr_db"] >= PARITY_GATE_DB, result


def test_projector_kernel_is_linear_1_time_major() -> None:
    d, hidden = 3, 2
    w = torch.arange(hidden * 4 * d, dtype=torch.float32).reshape(hidden, 4 * d)
    k = projector_conv_weight(w, d)
    assert k.shape == (hidden, d, 1, 4)
    for h in range(hidden):
        for c in range(d):
            for j in range(4):
                assert k[h, c, 0, j] == w[h, j * d + c]


def _channel_major(linear_1: torch.Tensor, d_model: int) -> torch.Tensor:
    """The original scripts' bug: column c*4 + j instead of j*d + c."""
    return linear_1.reshape(linear_1.shape[0], d_model, 4).unsqueeze(2)


_ane_state_dict = model_module.ane_state_dict


def _unscaled_q(weights: dict[str, torch.Tensor], dims) -> dict[str, torch.Tensor]:
    """q_proj's weights without the 1/sqrt(head_dim) scale folded in."""
    state = _ane_state_dict(weights, dims)
    return {k: v / dims.head_dim**-0.5 if ".q_proj." in k else v for k, v in state.items()}


MUTATIONS = {
    "channel-major frame grouping": ("projector_conv_weight", _channel_major),
    "q not scaled": ("ane_state_dict", _unscaled_q),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_mutations_fail_the_parity_gate(mutation: str, extracted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, replacement = MUTATIONS[mutation]
    if "." in target:
        cls, attr = target.split(".")
        monkeypatch.setattr(getattr(model_module, cls), attr, replacement)
    else:
        monkeypatch.setattr(model_module, target, replacement)
    _, result = compute_reference(extracted, None, "split_heads", 256)
    assert result["psnr_db"] < 40, result


def test_reference_is_built_from_the_extracted_weights(extracted: Path) -> None:
    _, dims, _ = load_extracted(extracted)
    assert dims == DEMO_DIMS
    tensors, result = compute_reference(extracted, None, "split_heads", 256)
    assert result["psnr_db"] >= PARITY_GATE_DB
    assert tensors["transformers"].shape == (dims.n_embeddings, dims.hidden_size)
    assert tensors["mel"].shape == (1, 128, 3000)
