"""Compression measured on trained weights: Whisper base's encoder in the Voxtral layout (conf/model/whisper-base.yaml).

For each recipe: calibration (data-aware recipes) and conversion times, package size, and the package executed by
the MIL runtime vs transformers in fp32 on 12 s and 70 s of espeak-ng speech (PSNR, token cosines); then the
task-level check: Whisper base's trained decoder greedily transcribes clips from the encoder states of the fp32
model and of each package (the package's program up to the encoder's final LayerNorm, run by the MIL runtime), and
the token ids are compared. Results: artifacts/bench/trained/summary.json and summary.md.

    python -m benchmarks.trained [--recipes fp16,int8,...] [--clips 20] [--clip-seconds 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from voxtral_coreml.check.milrun import load_package
from voxtral_coreml.check.whisper_decoder import WhisperDecoder, token_agreement
from voxtral_coreml.encoders.reference import TransformersReference
from voxtral_coreml.export.calibration import calibrate
from voxtral_coreml.export.convert import convert_package, tree_size
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.export.torch_compress import TORCH_KINDS, load_calibration, save_calibration
from voxtral_coreml.features.espeak import clips, speech
from voxtral_coreml.features.logmel import log_mel_windows
from voxtral_coreml.numerics.metrics import token_cosine_stats
from voxtral_coreml.pipeline.atomic import write_json_atomic, write_text_atomic
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import ARTIFACTS
from voxtral_coreml.report.markdown import table_head, table_row
from voxtral_coreml.sources.ct2 import read_ct2_model
from voxtral_coreml.sources.download import materialize_checkpoint
from voxtral_coreml.sources.extract import extract_audio_tower, load_extracted
from voxtral_coreml.sources.whisper_ct2 import installed_parts

MODEL = "whisper-base"
OUT = Path(ARTIFACTS) / "bench" / "trained"
RECIPES = (
    "fp16",
    "int8",
    "gptq4",
    "pal4",
    "pal6s",
    "skm6g",
    "pal6",
    "pal8",
    "pal4g",
    "pal4s",
    "gptq8",
    "skm4g",
    "int4b",
)
TEST_CLIPS = {"12s": (12.0, 0), "70s": (70.0, 1)}  # seconds, espeak clip index
TASK_FIRST = 200  # task clips: espeak clip indexes from here (calibration uses 100 on, the PSNR clips 0 and 1)
log = logging.getLogger("benchmarks.trained")


def prepare() -> Path:
    source = lookup(load_params(), f"models.{MODEL}.source")
    checkpoint, extracted = OUT / "checkpoint", OUT / "extracted"
    if not checkpoint.is_dir():
        materialize_checkpoint(MODEL, source, checkpoint)
    if not extracted.is_dir():
        extract_audio_tower(checkpoint, extracted, source=source)
    return extracted


def run_windows(model, mel: torch.Tensor) -> torch.Tensor:
    name = model.inputs[0].name
    outs = [model.predict({name: mel[i : i + 1].numpy()})[model.outputs[0].name] for i in range(mel.shape[0])]
    return torch.from_numpy(np.concatenate(outs)).float()


def encoder_states_model(package: Path):
    """The package's program cut at the projector's input (the input of its first conv, the second-last conv op): the
    encoder's final LayerNorm output, the encoder-only part of the same compressed package, (1, d_model, 1, frames)."""
    model = load_package(package)
    main = model.program.functions["main"]
    projector_in = [op for op in main.operations if op.op_type == "conv"][-2].inputs["x"]
    main.set_outputs([projector_in])
    from voxtral_coreml.check.milrun import load_program

    return load_program(model.program)


def decode_all(decoder: WhisperDecoder, states: list[torch.Tensor]) -> list[list[int]]:
    return decoder.greedy_batch(torch.cat(states))


def calibration(extracted: Path, recipe: Recipe, jobs: int) -> tuple[dict, dict]:
    """calibrate(), cached in OUT/calibration/ (with its times) as the pipeline caches it beside the scan."""
    cache = OUT / "calibration" / f"{recipe.name}.safetensors"
    info_file = cache.with_suffix(".json")
    if cache.is_file() and info_file.is_file() and json.loads(info_file.read_text())["recipe_params"] == recipe.params:
        return load_calibration(cache), json.loads(info_file.read_text())
    state, info = calibrate(extracted, recipe, jobs=jobs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_calibration(cache, state, info)
    write_json_atomic(info_file, {**info, "recipe_params": recipe.params})
    return state, info


def measure_recipe(name: str, extracted: Path, refs: dict, task: dict | None, decoder: WhisperDecoder | None) -> dict:
    params = load_params()
    recipe = Recipe.from_config(name, lookup(params, f"recipes.{name}"))
    row: dict = {"recipe": name, "kind": recipe.kind}
    calibrated = None
    if recipe.kind in TORCH_KINDS:
        calibrated, info = calibration(extracted, recipe, lookup(params, "sensitivity.jobs"))
        row.update(calibration_s=info["seconds"], calibration_device=info["device"], peak_rss_gib=info["peak_rss_gib"])
    package = OUT / "packages" / name / "VoxtralEncoderMini.mlpackage"
    started = time.monotonic()
    try:
        build = lookup(params, "build")
        manifest = convert_package(extracted, package, recipe, model_name=MODEL, variant="Mini",
                                   attention=build["attention"], query_chunk=build["query_chunk"],
                                   calibrated=calibrated)  # fmt: skip
    except VoxtralError as e:
        return {**row, "error": str(e)}
    row.update(convert_s=round(time.monotonic() - started, 1), size_bytes=tree_size(package),
               average_bits=manifest["compression"].get("average_bits"))  # fmt: skip
    model = load_package(package)
    for clip, (mel, expected) in refs.items():
        got = run_windows(model, mel).reshape(expected.shape)
        row[clip] = token_cosine_stats(expected, got)
    if task is None or decoder is None:
        log.info("%s: %s", name, json.dumps(row))
        return row
    states_model = encoder_states_model(package)
    states = [run_windows(states_model, mel).squeeze(2).transpose(1, 2) for mel in task["mels"]]
    tokens = decode_all(decoder, states)
    agreement = [token_agreement(ref, got) for ref, got in zip(task["tokens"], tokens, strict=True)]
    mean = round(float(np.mean(agreement)), 4)
    row["task"] = {
        "token_agreement": mean,
        "identical_clips": sum(a == 1.0 for a in agreement),
        "clips": len(agreement),
    }
    log.info("%s: %s", name, json.dumps(row))
    return row


def fp32_task(extracted: Path, decoder: WhisperDecoder, n: int, seconds: float) -> dict:
    """The clips' mels, and the tokens decoded from transformers' fp32 encoder states (cached in OUT)."""
    weights, dims, _ = load_extracted(extracted)
    mels = [log_mel_windows(audio, n_mels=dims.n_mels) for audio in clips(n, seconds, TASK_FIRST)]
    cache = OUT / f"fp32_tokens_{n}x{seconds:g}s.json"
    if cache.is_file():
        return {"mels": mels, "tokens": json.loads(cache.read_text())}
    tower = TransformersReference(weights, dims).model.model.audio_tower
    with torch.inference_mode():
        states = [tower(mel).last_hidden_state for mel in mels]
    tokens = decode_all(decoder, states)
    write_json_atomic(cache, tokens)
    return {"mels": mels, "tokens": tokens}


def summary_md(rows: list[dict], task_clips: int) -> str:
    head = ["recipe", "kind", "MB", "bits", "12 s dB", "12 s median cos", "12 s >= 0.98", "70 s dB", "70 s p1 cos",
            "70 s >= 0.98", f"tokens agree ({task_clips} clips)", "calibration s", "convert s"]  # fmt: skip
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["recipe"], r["kind"], r["error"], *[""] * (len(head) - 3)])
            continue
        a, b = r["12s"], r["70s"]
        body.append([r["recipe"], r["kind"], f"{r['size_bytes'] / 1e6:.1f}", r["average_bits"], a["psnr_db"],
                     a["cosine_median"], a["share_ge_0.98"], b["psnr_db"], b["cosine_p01"], b["share_ge_0.98"],
                     r.get("task", {}).get("token_agreement", "-"), r.get("calibration_s", ""),
                     r["convert_s"]])  # fmt: skip
    return "\n".join([*table_head(head), *map(table_row, body)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--task-recipes", default="fp16,int8,gptq4,pal4,pal6s,skm6g", help="those the decoder checks")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--clip-seconds", type=float, default=8.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    extracted = prepare()
    weights, dims, _ = load_extracted(extracted)
    reference = TransformersReference(weights, dims)
    refs = {}
    for clip, (seconds, index) in TEST_CLIPS.items():
        mel = log_mel_windows(speech(seconds, index), n_mels=dims.n_mels)
        refs[clip] = (mel, reference.audio_embeddings(mel))
    decoder = WhisperDecoder(read_ct2_model(installed_parts(lookup(load_params(), f"models.{MODEL}.source.packages"))))
    task = fp32_task(extracted, decoder, args.clips, args.clip_seconds)
    rows: list[dict] = []
    for name in args.recipes.split(","):  # the summary after each recipe: a long run's results so far survive
        checked = name in args.task_recipes.split(",")
        rows.append(measure_recipe(name, extracted, refs, task if checked else None, decoder if checked else None))
        result = {"model": MODEL, "dims": dims.to_json(), "task_clips": args.clips, "clip_seconds": args.clip_seconds,
                  "fp32_tokens": task["tokens"], "recipes": rows}  # fmt: skip
        write_json_atomic(OUT / "summary.json", result)
        write_text_atomic(OUT / "summary.md", summary_md(rows, args.clips) + "\n")
    print(summary_md(rows, args.clips))


if __name__ == "__main__":
    main()
