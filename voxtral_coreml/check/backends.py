"""Running a package: the MIL runtime anywhere, Core ML itself on macOS.

`load_predictor` loads a package once for many calls (inputs and outputs by name, numpy arrays);
`run_package` returns an encoder package's `audio_embeddings` for one mel window and the timings it measured.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxtral_coreml.export.convert import INPUT_NAME, OUTPUT_NAME
from voxtral_coreml.pipeline.errors import VoxtralError

BACKENDS = ("auto", "mil", "coreml")
COREML_TIMED_RUNS = 10  # predictions for the median latency on a device
COMPUTE_UNITS = ("CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU", "ALL")  # ct.ComputeUnit names; validation uses the first

Predictor = Callable[[dict[str, np.ndarray]], dict[str, Any]]


def resolve_backend(backend: str, setting: str = "validation.backend") -> str:
    """auto -> the platform's backend; `setting` names where the value came from, for the error."""
    if backend not in BACKENDS:
        raise VoxtralError(f"{setting}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "coreml" if sys.platform == "darwin" else "mil"
    if backend == "coreml" and sys.platform != "darwin":
        raise VoxtralError(f"{setting}: coreml needs macOS; use mil (or auto) on this machine")
    return backend


def coreml_model(package: Path, compute_units: str = COMPUTE_UNITS[0]):  # pragma: no cover
    """Core ML's model of the package, compiled for the Neural Engine unless told otherwise (macOS only)."""
    import coremltools as ct

    return ct.models.MLModel(str(package), compute_units=ct.ComputeUnit[compute_units])


def load_predictor(backend: str, package: Path) -> Predictor:
    """The package's predict function: Core ML's, or its MIL program executed op by op with PyTorch kernels."""
    if backend == "coreml":
        return coreml_model(package).predict
    from .milrun import load_package

    return load_package(package).predict


def run_mil(package: Path, mel: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The package's own MIL program, executed op by op with PyTorch kernels, fp16 results rounded to fp16."""
    started = time.perf_counter()
    predict = load_predictor("mil", package)
    loaded = time.perf_counter()
    outputs = predict({INPUT_NAME: mel.numpy().astype(np.float32)})
    finished = time.perf_counter()
    timings = {"load_s": round(loaded - started, 3), "predict_s": round(finished - loaded, 3)}
    return torch.from_numpy(np.asarray(outputs[OUTPUT_NAME], dtype=np.float32)), timings


def run_coreml(
    package: Path, mel: torch.Tensor, compute_units: str = COMPUTE_UNITS[0]
) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
    """Core ML on the Neural Engine (macOS only; not run in CI): embeddings, load and latency figures."""
    started = time.perf_counter()
    model = coreml_model(package, compute_units)
    first_load = time.perf_counter() - started
    inputs = {INPUT_NAME: mel.numpy().astype(np.float32)}
    embeddings = model.predict(inputs)[OUTPUT_NAME]
    latencies = []
    for _ in range(COREML_TIMED_RUNS):
        t = time.perf_counter()
        model.predict(inputs)
        latencies.append(time.perf_counter() - t)
    timings = {"first_load_s": round(first_load, 3), "median_latency_s": round(statistics.median(latencies), 4)}
    share = neural_engine_share(model)
    if share is not None:
        timings["ane_op_share"] = round(share, 4)
    return torch.from_numpy(np.asarray(embeddings, dtype=np.float32)), timings


def neural_engine_share(model) -> float | None:  # pragma: no cover
    """The share of the main function's ops that Core ML's compute plan prefers to run on the Neural Engine."""
    try:
        from coremltools.models.compute_device import MLNeuralEngineComputeDevice
        from coremltools.models.compute_plan import MLComputePlan
    except ImportError:  # older coremltools without compute plans
        return None
    plan = MLComputePlan.load_from_path(path=model.get_compiled_model_path(), compute_units=model.compute_unit)
    operations = plan.model_structure.program.functions["main"].block.operations
    usages = [plan.get_compute_device_usage_for_mlprogram_operation(op) for op in operations]
    placed = [u for u in usages if u is not None]
    if not placed:
        return None
    on_ne = sum(isinstance(u.preferred_compute_device, MLNeuralEngineComputeDevice) for u in placed)
    return on_ne / len(placed)


def run_package(backend: str, package: Path, mel: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    return run_coreml(package, mel) if backend == "coreml" else run_mil(package, mel)
