"""Voxtral Realtime as Core AI assets (formats.py's coreai): the offline window, and the streaming step as a
stateful function.

The modules are the Core ML packages' (model.py, ANE layout); the step is export.py's StatefulStep, whose buffers
(the convs' left contexts, the key/value ring buffers) it updates in place: coreai-torch makes each such buffer a
Core AI state, which the runtime keeps between calls (an app allocates it once per stream). Core ML's explicit and
multifunction forms have no Core AI counterpart here.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from voxtral_coreml.export.convert import write_manifest
from voxtral_coreml.export.coreai import asset_manifest, check_attention_precision, compression_settings, export_encoder
from voxtral_coreml.export.formats import FORMATS
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted

from .export import STATE_NAMES, StatefulStep, feeding, io_contract, streaming_info
from .model import build_offline_encoder, build_step_encoder

log = logging.getLogger(__name__)

STREAMING_FORMS = FORMATS["coreai"].streaming_forms  # Core AI states


def convert_asset(
    extracted_dir: str | os.PathLike[str],
    asset: str | os.PathLike[str],
    recipe: Recipe,
    *,
    model_name: str,
    variant: str | None = None,
    attention: str,
    query_chunk: int,
    attention_precision: str,
    streaming: dict | None = None,
) -> dict:
    """The offline window (or, with `streaming` = {form: stateful, tokens_per_step}, the stateful step) as a Core AI
    asset at `asset`, its manifest beside it: the Core ML packages' I/O contract and `streaming` entry."""
    started = time.monotonic()
    asset = Path(asset)
    compression = compression_settings(recipe)
    check_attention_precision(attention_precision)
    if streaming is not None and streaming["form"] not in STREAMING_FORMS:
        forms = ", ".join(STREAMING_FORMS)
        raise VoxtralError(f"streaming form {streaming['form']!r}: a Core AI asset streams in the form {forms} only")
    weights, dims, encoder_meta = load_extracted(extracted_dir, dtype=torch.float16)  # fp16 weights and compute
    info = None if streaming is None else streaming_info(dims, streaming["form"], int(streaming["tokens_per_step"]))
    if info is None:
        module, states, what = build_offline_encoder(weights, dims, attention, query_chunk), (), "offline window"
    else:
        k = info["tokens_per_step"]
        module = StatefulStep(build_step_encoder(weights, dims, k, attention, query_chunk))
        states, what = STATE_NAMES, f"stateful step, {k} token(s)"
    log.info("exporting %s (Realtime, %d layers, %s) to Core AI with recipe %s", model_name, dims.n_layers, what,
             recipe.name)  # fmt: skip
    contract = io_contract(dims, {"streaming": info})
    description = f"Voxtral Realtime audio encoder + projector, {what} ({recipe.name})"
    export_encoder(module, contract, asset, compression, attention_precision=attention_precision,
                   description=description, state_names=states)  # fmt: skip
    manifest = asset_manifest(
        asset, recipe, compression, contract, model=model_name, family="realtime", variant=variant or "Realtime",
        dims=dims.to_json(), attention=attention, query_chunk=query_chunk, attention_precision=attention_precision,
        **feeding(), weights_sha256=encoder_meta["weights_sha256"], source=encoder_meta.get("source", {}),
    )  # fmt: skip
    if info is not None:
        manifest["streaming"] = info
    write_manifest(asset, manifest, started)
    return manifest
