"""Layer-by-layer conversion (export/layered.py): the same program as converting the module whole, and a clear
refusal when a MIL pass rewrites a layer's weight (which copying the layer's program would get wrong)."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import BUILD
from voxtral_coreml.check.backends import run_mil
from voxtral_coreml.encoders import model as model_2507
from voxtral_coreml.encoders.realtime.dims import RealtimeDims
from voxtral_coreml.encoders.realtime.model import build_offline_encoder
from voxtral_coreml.export.convert import INPUT_NAME, OUTPUT_NAME, convert_to_mlprogram, mel_example
from voxtral_coreml.export.layered import LAYER_KEY, layered_mlprogram, one_layer, outside_layers
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted

REALTIME = RealtimeDims(d_model=64, n_layers=3, n_heads=4, head_dim=32, ffn_dim=256, hidden_size=96, rope_theta=1e6)
TARGET = "iOS16"


def random_weights(dims, seed: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: ((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)).half()
        for name, shape in dims.tensor_shapes().items()
    }


def builder(family: str):
    build = model_2507.build_ane_encoder if family == "2507" else build_offline_encoder
    return functools.partial(build, attention=BUILD["attention"], query_chunk=BUILD["query_chunk"])


@pytest.fixture(scope="module")
def models(extracted: Path) -> dict[str, tuple[dict, object]]:
    weights, dims, _ = load_extracted(extracted, dtype=torch.float16)
    return {"2507": (weights, dims), "realtime": (random_weights(REALTIME), REALTIME)}


def ops_of(mlmodel) -> Counter:
    function = mlmodel.get_spec().mlProgram.functions["main"]
    return Counter(op.type for op in function.block_specializations[function.opset].operations)


@pytest.mark.parametrize("family", ["2507", "realtime"])
def test_layered_program_computes_what_the_whole_one_does(family: str, models: dict, tmp_path: Path) -> None:
    weights, dims = models[family]
    build = builder(family)
    layered = layered_mlprogram(weights, dims, build, TARGET, (INPUT_NAME, OUTPUT_NAME), mel_example(dims))
    whole = convert_to_mlprogram(build(weights, dims), TARGET)
    counts = {name: ops_of(m) for name, m in (("layered", layered), ("whole", whole))}
    # The same ops; a constant that ct.convert shares between layers (an axis, a shape) is one per layer here.
    assert counts["layered"] - Counter(const=10**6) == counts["whole"] - Counter(const=10**6)
    assert counts["layered"]["const"] >= counts["whole"]["const"]
    layered.save(str(tmp_path / "layered.mlpackage"))
    whole.save(str(tmp_path / "whole.mlpackage"))
    sizes = [
        (tmp_path / p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        for p in ("layered.mlpackage", "whole.mlpackage")
    ]
    assert sizes[0] == sizes[1]  # every weight once, shared tables once
    mel = torch.randn(1, dims.n_mels, dims.mel_frames, generator=torch.Generator().manual_seed(0))
    outputs = [run_mil(tmp_path / p, mel)[0] for p in ("layered.mlpackage", "whole.mlpackage")]
    assert outputs[0].shape == (1, dims.n_embeddings, dims.hidden_size)
    assert torch.equal(outputs[0], outputs[1])


def test_each_layer_gets_its_own_weights(models: dict, tmp_path: Path) -> None:
    # Swapping two layers' weights changes the layered package's output: each copy of the layer reads its own.
    weights, dims = models["2507"]
    swapped = {LAYER_KEY.sub(lambda m: m.group(0).replace(m.group(1), {"0": "1", "1": "0"}[m.group(1)]), n): w
               for n, w in weights.items()}  # fmt: skip
    mel = torch.randn(1, dims.n_mels, dims.mel_frames, generator=torch.Generator().manual_seed(1))
    outputs = []
    for name, w in (("kept", weights), ("swapped", swapped)):
        mlmodel = layered_mlprogram(w, dims, builder("2507"), TARGET, (INPUT_NAME, OUTPUT_NAME), mel_example(dims))
        mlmodel.save(str(tmp_path / f"{name}.mlpackage"))
        outputs.append(run_mil(tmp_path / f"{name}.mlpackage", mel)[0])
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)


def test_one_layer_renumbers_the_layer_and_keeps_the_rest(models: dict) -> None:
    weights, _ = models["2507"]
    outside = outside_layers(weights)
    picked = one_layer(weights, 1, outside)
    assert set(outside) <= set(picked) and not any(LAYER_KEY.search(n) for n in outside)
    assert picked["audio_tower.layers.0.fc1.weight"] is weights["audio_tower.layers.1.fc1.weight"]
    assert not any(".layers.1." in n for n in picked)


def _scale_in_forward(self, x: torch.Tensor) -> torch.Tensor:
    """q scaled in the graph, as this module once did: ct.convert folds the product into q_proj's weight."""
    q = self.q_proj(x) * model_2507.scalar_like(0.5, x)
    return self.out_proj(self.core(q, self.k_proj(x), self.v_proj(x)))


def test_a_weight_a_pass_rewrote_is_refused(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_2507.SelfAttention, "forward", _scale_in_forward)
    weights, dims = models["2507"]
    refused = r"parameter layers\.0\.self_attn\.q_proj\.bias is in no constant .* constant mul\w* has its size"
    with pytest.raises(VoxtralError, match=refused):
        layered_mlprogram(weights, dims, builder("2507"), TARGET, (INPUT_NAME, OUTPUT_NAME), mel_example(dims))


def test_lazy_weights_read_the_same_tensors(extracted: Path) -> None:
    eager, dims, _ = load_extracted(extracted, dtype=torch.float16)
    lazy, lazy_dims, _ = load_extracted(extracted, dtype=torch.float16, lazy=True)
    assert lazy_dims == dims and list(lazy) == list(eager) and len(lazy) == len(eager)
    for name in eager:
        assert lazy[name].dtype == torch.float16 and torch.equal(lazy[name], eager[name]), name
