"""Work the benchmark measures that is not a pipeline stage; each runs in its own process (`python -m ...`).

Every task prints one JSON object on its last stdout line: what it measured from the inside.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from voxtral_coreml.check.validate import find_package, load_reference
from voxtral_coreml.export.convert import INPUT_NAME, OUTPUT_NAME
from voxtral_coreml.pipeline.paths import extracted_dir, package_dir, reference_file
from voxtral_coreml.pipeline.runner import configure_logging
from voxtral_coreml.sources.extract import load_extracted


def naive_convert(model: str, out: Path) -> dict:
    """The baseline: transformers' modules, torch.jit.trace with a real forward, ct.convert to fp16."""
    import coremltools as ct

    from voxtral_coreml.encoders.reference import TransformersReference

    weights, dims, _ = load_extracted(extracted_dir(model))
    reference = TransformersReference(weights, dims)

    class AudioFeatures(torch.nn.Module):  # get_audio_features as a traceable module
        def __init__(self) -> None:
            super().__init__()
            self.inner = reference.model.model

        def forward(self, mel: torch.Tensor) -> torch.Tensor:
            return self.inner.get_audio_features(mel).pooler_output

    mel = load_reference(reference_file(model))["mel"]
    started = time.perf_counter()
    traced = torch.jit.trace(AudioFeatures().eval(), (mel,), strict=False)
    traced_s = time.perf_counter() - started
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(mel.shape), dtype=np.float32)],
        outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=ct.target.iOS16,
        skip_model_load=True,
    )
    mlmodel.save(str(out))
    ops = Counter(op.op_type for op in mlmodel._mil_program.functions["main"].operations if op.op_type != "const")
    return {"trace_s": round(traced_s, 2), "ops_total": sum(ops.values())}


def attention_variant(model: str, attention: str, out: Path) -> dict:
    """Convert with one attention core: its op count (Neural Engine compile time grows with it)."""
    from voxtral_coreml.export.convert import convert_package
    from voxtral_coreml.export.recipes import Recipe
    from voxtral_coreml.pipeline.conf import build_settings

    manifest = convert_package(
        extracted_dir(model), out, Recipe("fp16", "fp16", "iOS16", 0.0), model_name=model, variant="Mini",
        attention=attention, query_chunk=build_settings()["query_chunk"],
    )  # fmt: skip
    return {"ops_total": manifest["ane"]["ops_total"], "ops": manifest["ane"]["ops"]}


def validate(model: str, recipe: str) -> dict:
    """The validate stage's work without its gate, so every recipe's PSNR is recorded, even below the gate."""
    from voxtral_coreml.check.validate import validate_package

    reference = load_reference(reference_file(model))
    metrics, timings = validate_package(package_dir(model, recipe), reference, 0.0, enforce_gate=False)
    return {"psnr_db": metrics["psnr_db"], "cosine_min": metrics["cosine_min"], **timings}


def hub_fetch(model: str, out: Path) -> dict:
    """The model's checkpoint served by the tests' local Hub, fetched as the hub source does: bytes on the wire."""
    import os
    import sys

    from voxtral_coreml.pipeline.paths import checkpoint_dir
    from voxtral_coreml.sources.hub import fetch_tensors
    from voxtral_coreml.sources.layouts import is_encoder_tensor_any_layout

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hub_server import FakeRepo, HubServer

    with HubServer() as server:
        repo = server.add_repo(FakeRepo(f"bench/{model}", checkpoint_dir(model)))
        os.environ["HF_ENDPOINT"] = server.endpoint
        os.environ["HF_HUB_CACHE"] = str(out.parent / "hf-cache")
        record = fetch_tensors(repo.repo_id, repo.commit, out, wanted=is_encoder_tensor_any_layout, progress=False)
        sent = server.bytes_sent(repo.repo_id)
    repo_bytes = sum(f.stat().st_size for f in checkpoint_dir(model).rglob("*.safetensors"))
    return {
        "bytes_sent": sent,
        "tensor_bytes": record["tensor_bytes"],
        "repo_safetensors_bytes": repo_bytes,
        "sent_over_tensor_bytes": round(sent / record["tensor_bytes"], 4),
    }


def mil_forward(model: str, recipe: str) -> dict:
    """One window through the MIL runtime (load excluded)."""
    from voxtral_coreml.check.milrun import load_package

    package, _ = find_package(package_dir(model, recipe))
    mil = load_package(package)
    mel = load_reference(reference_file(model))["mel"].numpy()
    started = time.perf_counter()
    mil.predict({INPUT_NAME: mel})
    return {"forward_s": round(time.perf_counter() - started, 3)}


def reference_forward(model: str) -> dict:
    """One window through transformers' get_audio_features in fp32 (load excluded)."""
    from voxtral_coreml.encoders.reference import TransformersReference

    weights, dims, _ = load_extracted(extracted_dir(model))
    reference = TransformersReference(weights, dims)
    mel = load_reference(reference_file(model))["mel"]
    started = time.perf_counter()
    reference.audio_embeddings(mel)
    return {"forward_s": round(time.perf_counter() - started, 3)}


def coreml_latency(model: str, recipe: str, compute_units: str) -> dict:  # pragma: no cover
    """macOS only: Core ML's first load (compilation for the chosen units included) and median latency per window."""
    from voxtral_coreml.check.backends import run_coreml

    package, _ = find_package(package_dir(model, recipe))
    _, timings = run_coreml(package, load_reference(reference_file(model))["mel"], compute_units)
    return timings


def stream_convert(model: str, k: int, out: Path) -> dict:
    """The stateful streaming step of a Realtime model: ops, GFLOPs per step, state bytes, package size."""
    from voxtral_coreml.encoders.families import family_of_extracted
    from voxtral_coreml.export.recipes import Recipe
    from voxtral_coreml.pipeline.conf import build_settings

    family, streaming = family_of_extracted(extracted_dir(model)), {"form": "stateful", "tokens_per_step": k}
    manifest = family.convert_package(
        extracted_dir(model), out / family.package_name(None, streaming), Recipe("fp16", "fp16", "iOS16", 0.0),
        model_name=model, streaming=streaming, **{key: build_settings()[key] for key in ("attention", "query_chunk")},
    )  # fmt: skip
    return {
        "ops_total": manifest["ane"]["ops_total"],
        "gflops_per_step": manifest["ane"]["gflops_per_window"],
        "state_bytes": manifest["streaming"]["state_bytes"],
        "package_gb": round(manifest["size_bytes"] / 1024**3, 3),
    }


STEPS_TIMED = 8  # after the ring buffer holds some past: steps 2..9 of a stream


def mil_step(model: str, k: int, out: Path) -> dict:
    """The MIL runtime's median time per streaming step (load excluded)."""
    from voxtral_coreml.encoders.realtime.family import speech_window
    from voxtral_coreml.encoders.realtime.stream import Streamer, load_streaming_model

    package, manifest = find_package(out)
    streamer = Streamer(load_streaming_model("mil", package), manifest["streaming"], str(package))
    frames = 8 * k
    mel = speech_window(frames * (STEPS_TIMED + 2)).numpy()
    times = []
    for i in range(STEPS_TIMED + 2):
        started = time.perf_counter()
        streamer.step(mel[..., i * frames : (i + 1) * frames])
        times.append(time.perf_counter() - started)
    return {"step_s": round(float(np.median(times[2:])), 4)}


def reference_step(model: str, k: int, out: Path) -> dict:
    """transformers' streaming get_audio_features (padding_cache, cache), median time per step of k tokens."""
    from voxtral_coreml.encoders.realtime.family import speech_window
    from voxtral_coreml.encoders.realtime.reference import RealtimeReference

    weights, dims, _ = load_extracted(extracted_dir(model))
    model_ref = RealtimeReference(weights, dims).model
    frames = 8 * k
    mel = speech_window(frames * (STEPS_TIMED + 2))
    cache = padding = None
    times = []
    for i in range(STEPS_TIMED + 2):
        started = time.perf_counter()
        result = model_ref.get_audio_features(
            input_features=mel[..., i * frames : (i + 1) * frames], padding_cache=padding, cache=cache, use_cache=True
        )
        cache, padding = result.cache, result.padding_cache
        times.append(time.perf_counter() - started)
    return {"step_s": round(float(np.median(times[2:])), 4)}


TASKS = {
    "stream_convert": lambda a: stream_convert(a.model, a.k, a.out),
    "mil_step": lambda a: mil_step(a.model, a.k, a.out),
    "reference_step": lambda a: reference_step(a.model, a.k, a.out),
    "naive": lambda a: naive_convert(a.model, a.out),
    "attention": lambda a: attention_variant(a.model, a.attention, a.out),
    "validate": lambda a: validate(a.model, a.recipe),
    "hub_fetch": lambda a: hub_fetch(a.model, a.out),
    "mil_forward": lambda a: mil_forward(a.model, a.recipe),
    "reference_forward": lambda a: reference_forward(a.model),
    "coreml_latency": lambda a: coreml_latency(a.model, a.recipe, a.compute_units),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("model")
    parser.add_argument("--recipe", default="fp16")
    parser.add_argument("--attention")  # the attention task's core
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compute-units", default="CPU_AND_NE")
    parser.add_argument("--k", type=int, default=1, help="tokens per streaming step")
    args = parser.parse_args()
    configure_logging()
    torch.set_grad_enabled(False)
    print(json.dumps(TASKS[args.task](args)))


if __name__ == "__main__":
    main()
