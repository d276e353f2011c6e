"""Running and describing a Core AI asset with Apple's own runtime (coreai-core).

On Linux, `asset.executable()` compiles the asset for a CPU runtime bundled with coreai-core (no compute-unit
choice); on macOS 27 the same call loads it with the device's Core AI framework. Either way it is Apple's executor,
independent of this project's MIL runtime, so the two check each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxtral_coreml.export.convert import INPUT_NAME, OUTPUT_NAME
from voxtral_coreml.export.coreai import quiet_coreai
from voxtral_coreml.pipeline.errors import VoxtralError

BACKEND = "coreai"
FUNCTION = "main"
# The summary's type strings: "NDArray (Float32, 1 × 128 × 3000)".
_NDARRAY = re.compile(r"NDArray \((\w+), ([\d × ]+)\)")


def runtime_name() -> str:
    """Which runtime `asset.executable()` uses here: what `encode` and the metrics report."""
    return "Core AI framework (macOS)" if sys.platform == "darwin" else "coreai-core's CPU runtime (Linux)"


def load_asset(asset: Path) -> Any:
    with quiet_coreai():
        from coreai.authoring import AIModelAsset

    try:
        return AIModelAsset.load(asset)
    except RuntimeError as e:
        raise VoxtralError(f"{asset}: not a readable Core AI asset ({e})") from None


class AssetPredictor:
    """One loaded asset function, called with numpy arrays by name (the Core ML predictors' interface); a stateful
    function as Core ML's stateful models are driven: `make_state()` once per stream, `predict(inputs, state)`."""

    def __init__(self, asset: Path, states: tuple[dict, ...] = ()) -> None:
        self._loop = asyncio.new_event_loop()
        self._stack = contextlib.AsyncExitStack()
        model = self._loop.run_until_complete(self._stack.enter_async_context(load_asset(asset).executable()))
        self._function = model.load_function(FUNCTION)
        self._states = states  # {name, shape, dtype}: what the manifest's `streaming.states` records

    def make_state(self) -> dict[str, Any]:
        """A fresh stream's state: zeros, which the runtime updates in place at every call."""
        from coreai.runtime import NDArray

        return {s["name"]: NDArray(np.zeros(s["shape"], dtype=s["dtype"])) for s in self._states}

    def predict(self, inputs: dict[str, np.ndarray], state: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        from coreai.runtime import NDArray

        arrays = {name: NDArray(np.ascontiguousarray(value)) for name, value in inputs.items()}
        call = self._function(arrays) if state is None else self._function(arrays, state=state)
        outputs = self._loop.run_until_complete(call)
        return {name: value.numpy() for name, value in outputs.items()}

    __call__ = predict

    def close(self) -> None:
        self._loop.run_until_complete(self._stack.aclose())
        self._loop.close()


@contextlib.contextmanager
def asset_predictor(asset: Path, states: tuple[dict, ...] = ()) -> Iterator[AssetPredictor]:
    """The asset's function, loaded by Apple's runtime; `states`: a stateful function's (manifest's streaming)."""
    predictor = AssetPredictor(asset, states)
    try:
        yield predictor
    finally:
        predictor.close()


def run_asset(asset: Path, mel: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """One encoder window through the asset: `audio_embeddings`, and the load (compile) and predict times."""
    started = time.perf_counter()
    with asset_predictor(asset) as predict:
        loaded = time.perf_counter()
        outputs = predict({INPUT_NAME: mel.numpy().astype(np.float32)})
        finished = time.perf_counter()
    timings = {"load_s": round(loaded - started, 3), "predict_s": round(finished - loaded, 3)}
    return torch.from_numpy(np.asarray(outputs[OUTPUT_NAME], dtype=np.float32)), timings


def _io(entry: tuple[str, str]) -> dict[str, object]:
    name, text = entry
    match = _NDARRAY.fullmatch(text)
    if match is None:
        return {"name": name, "shape": [], "dtype": text}
    shape = [int(d) for d in match.group(2).split(" × ")]
    return {"name": name, "shape": shape, "dtype": match.group(1).lower()}


def asset_structure(asset: Path) -> dict[str, object]:
    """Functions, the main function's I/O, minimum OS, storage types and op counts, from the asset's program."""
    if not (asset / "main.mlirb").is_file():
        raise VoxtralError(f"{asset}: missing main.mlirb (not a Core AI asset)")
    loaded = load_asset(asset)
    summary = loaded.summary(include_statistics=True)
    if summary is None or FUNCTION not in summary.function_names:
        raise VoxtralError(f"{asset}: the asset has no '{FUNCTION}' function")
    ops = {name: count for name, count in summary.operation_distribution if name != "constant"}
    return {
        "functions": list(summary.function_names),
        "inputs": [_io(e) for e in summary.function_inputs(FUNCTION)],
        "outputs": [_io(e) for e in summary.function_outputs(FUNCTION)],
        "minimum_os": summary._compatibility_version,
        "storage_types": dict(summary.storage_types),
        "ops": dict(sorted(ops.items())),
        "description": loaded.metadata.model_description,
        "producer": loaded.metadata._producer,
    }
