"""Per-op sensitivity to palettization, and the bit widths of the `mixed` recipe.

An op's sensitivity at n bits is the encoder output's PSNR (vs the same module with fp16 weights, float64 compute) when
only that op's weight is palettized at n bits, by coremltools' own k-means: the LUT the package will get. Output
errors of independent perturbations add up as noise energy, so `choose_bits` spends a parameter-weighted bit budget
where it buys the most noise per bit.

Cost: the encoder runs once to cache every stage's input; each (op, bits) re-runs only from the op's stage on, on a
calibration window shorter than the 30 s the package takes (tests/test_compress.py shows it ranks ops the same).
With `jobs` > 1, worker processes compute the next ops' LUTs while this process runs the encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

from voxtral_coreml.encoders.dims import POSITIONS_KEY
from voxtral_coreml.encoders.families import family_of_extracted
from voxtral_coreml.encoders.model import VoxtralEncoderANE, build_ane_encoder
from voxtral_coreml.features.logmel import speech_mel
from voxtral_coreml.numerics.metrics import PSNR_CAP_DB, PSNR_DECIMALS, psnr_db
from voxtral_coreml.numerics.stable import float64, round_decimals
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.extract import load_extracted

from .compress import average_bits, compressible_weights, palettized, weight_op_names
from .recipes import Recipe

if TYPE_CHECKING:
    from coremltools.models import MLModel

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 1000  # 10 s of the speech clip: a third of the linear work, a ninth of attention's
SIM_ATTENTION = "fused_heads"  # the same math as every core (test_model.py), the fewest torch ops


def calibration_encoder(
    extracted_dir: str | os.PathLike[str], frames: int, audio: str | os.PathLike[str] | None = None
) -> tuple[VoxtralEncoderANE, torch.Tensor]:
    """The ANE module with fp16-rounded weights (what a package holds), in float64, on the first `frames` mel frames,
    and that mel. Positions are absolute, so a shorter window simply uses the first ones. In float64 (stable.py) the
    table's PSNRs are the same on any machine; in fp32 they moved by up to 0.003 dB between simulated machines."""
    weights, dims, _ = load_extracted(extracted_dir)
    if not 0 < frames <= dims.mel_frames:
        raise VoxtralError(f"sensitivity: frames {frames} is outside 1..{dims.mel_frames}")
    short = dataclasses.replace(dims, mel_frames=frames)  # checks frames is a multiple of 8
    weights = {n: float64(w.to(torch.float16)) for n, w in weights.items()}
    if POSITIONS_KEY in weights:
        weights[POSITIONS_KEY] = weights[POSITIONS_KEY][: short.n_positions]
    mel = float64(speech_mel(audio, dims.n_mels)[..., :frames].contiguous())
    return build_ane_encoder(weights, short, SIM_ATTENTION), mel


def _stages(model: torch.nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return model.stages()


def _stage_of(op: str, n_layers: int) -> int:
    """Which of _stages() holds a module weight."""
    if op.startswith("layers."):
        return int(op.split(".")[1]) + 1
    return 0 if op in ("conv1", "conv2") else n_layers + 1


def _cached_inputs(
    stages: list[Callable[[torch.Tensor], torch.Tensor]], mel: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each stage's input, and the output: one pass, after which a perturbed op needs only its own stage on."""
    inputs = [mel]
    for stage in stages:
        inputs.append(stage(inputs[-1]))
    return inputs[:-1], inputs[-1]


def _run_from(stages: list[Callable[[torch.Tensor], torch.Tensor]], start: int, x: torch.Tensor) -> torch.Tensor:
    for stage in stages[start:]:
        x = stage(x)
    return x


@contextmanager
def _swapped(param: torch.nn.Parameter, value: torch.Tensor) -> Iterator[None]:
    original = param.data
    param.data = value
    try:
        yield
    finally:
        param.data = original


def _variants(task: tuple[torch.Tensor, tuple[int, ...]]) -> dict[int, torch.Tensor]:
    weight, bits = task
    return {b: palettized(weight, b) for b in bits}


def kmeans_tasks(weights: dict[str, torch.nn.Parameter], bits: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, tuple]]:
    """One task per weight, on a copy: pickling a tensor for a worker moves its storage into shared memory, which the
    pool's feeder thread does while the scan runs the model on the parameters' own storages."""
    return ((w.detach().clone(), bits) for w in weights.values())


def _lookahead(pool: Executor | None, tasks: Iterable, depth: int) -> Iterator[dict[int, torch.Tensor]]:
    """_variants over tasks in order, at most `depth` computed ahead (each holds a few copies of one weight)."""
    if pool is None:
        yield from map(_variants, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(_variants, task))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def scan_settings(recipe: Recipe) -> dict:
    """What a scan's table depends on in a mixed recipe (target_bits changes only the choice)."""
    return {
        "candidate_bits": sorted(set(recipe.params["candidate_bits"])),
        "weight_threshold": recipe.params["weight_threshold"],
    }


def scan_sensitivity(
    extracted_dir: str | os.PathLike[str],
    recipe: Recipe,
    *,
    frames: int = DEFAULT_FRAMES,
    audio: str | os.PathLike[str] | None = None,
    jobs: int = 1,
) -> dict:
    """The sensitivity table of every compressible weight at every candidate bit width of a `mixed` recipe, and the
    bits `choose_bits` picks for its target. JSON-ready and deterministic (no timings): a cacheable output."""
    if not recipe.needs_scan:
        raise VoxtralError(f"recipe '{recipe.name}': the sensitivity scan is for mixed recipes, not {recipe.kind}")
    started = time.monotonic()
    settings = scan_settings(recipe)
    candidates = tuple(settings["candidate_bits"])
    model, mel = family_of_extracted(extracted_dir).calibration_encoder(extracted_dir, frames, audio)
    stages = _stages(model)
    weights = compressible_weights(model, settings["weight_threshold"])
    ops: dict[str, dict] = {}
    tasks = kmeans_tasks(weights, candidates)
    spawn = multiprocessing.get_context("spawn")  # fork would copy torch's and OpenMP's thread state
    with torch.no_grad(), ProcessPoolExecutor(jobs, spawn) if jobs > 1 else nullcontext() as pool:
        inputs, reference = _cached_inputs(stages, mel)
        for (op, weight), variants in zip(weights.items(), _lookahead(pool, tasks, jobs), strict=True):
            stage = _stage_of(op, model.dims.n_layers)
            psnr = {}
            for bits, value in variants.items():
                with _swapped(weight, value):
                    output = _run_from(stages, stage, inputs[stage])
                    psnr[str(bits)] = round_decimals(psnr_db(reference, output), PSNR_DECIMALS)
            ops[op] = {"params": weight.numel(), "stage": stage, "psnr_db": psnr}
            log.info("sensitivity %d/%d %s: %s dB", len(ops), len(weights), op, psnr)
    runs = sum(len(stages) - op["stage"] for op in ops.values()) * len(candidates)
    log.info(
        "sensitivity: %d ops x %d bit widths, %d stage runs on %d frames in %.1f s",
        len(ops),
        len(candidates),
        runs,
        frames,
        time.monotonic() - started,
    )
    table = {
        "recipe": recipe.name,
        **settings,
        "frames": frames,
        "reference": "the same module with fp16 weights, float64 compute",
        "ops": ops,
        "cost": {"stage_runs": runs, "kmeans_runs": len(ops) * len(candidates)},
    }
    bits = choose_bits(table, recipe.params["target_bits"])
    return {
        **table,
        "target_bits": recipe.params["target_bits"],
        "bits": bits,
        "average_bits": round(average_bits(bits, {op: ops[op]["params"] for op in ops}), 4),
        "predicted_psnr_db": round_decimals(predicted_psnr_db(table, bits), PSNR_DECIMALS),
    }


def program_bits(sensitivity: dict, recipe: Recipe, mlmodel: MLModel, model: torch.nn.Module) -> dict[str, int]:
    """`choose_bits` for the recipe's target_bits, keyed by the Core ML const op names `compress_mlmodel` takes
    (`model` is the module `mlmodel` was converted from)."""
    for key, wanted in scan_settings(recipe).items():
        if sensitivity[key] != wanted:  # a stale scan: its table does not describe this recipe's choices
            scanned = sensitivity[key]
            raise VoxtralError(f"recipe '{recipe.name}': {key} is {wanted}, the sensitivity scan used {scanned}")
    names = weight_op_names(mlmodel, model, recipe.params["weight_threshold"])
    return {names[op]: bits for op, bits in choose_bits(sensitivity, recipe.params["target_bits"]).items()}


def _noise(psnr: float) -> float:
    """PSNR -> mean squared error relative to the squared peak: the quantity that adds up across ops."""
    return 10.0 ** (-psnr / 10.0)


def predicted_psnr_db(sensitivity: dict, bits: dict[str, int]) -> float:
    """The PSNR of all ops compressed together, from the sum of their noise."""
    total = math.fsum(_noise(sensitivity["ops"][op]["psnr_db"][str(b)]) for op, b in bits.items())
    return PSNR_CAP_DB if total == 0 else min(PSNR_CAP_DB, -10.0 * math.log10(total))


def choose_bits(sensitivity: dict, target_bits: float) -> dict[str, int]:
    """Module name -> bits, averaging at most `target_bits` (weighted by parameter count) at the least total noise.

    Greedy: from every op at the widest candidate, lower the op whose step costs the least noise per bit saved
    until the budget holds; then spend what the last step left over on the best raises that still fit."""
    ops = sensitivity["ops"]
    candidates = sorted(sensitivity["candidate_bits"])
    if not candidates[0] <= target_bits:
        raise VoxtralError(f"target_bits {target_bits} is below the narrowest candidate, {candidates[0]} bits")
    size = {op: entry["params"] for op, entry in ops.items()}
    noise = {op: {b: _noise(entry["psnr_db"][str(b)]) for b in candidates} for op, entry in ops.items()}
    budget = target_bits * math.fsum(size.values())
    bits = dict.fromkeys(ops, candidates[-1])

    def used() -> float:
        return math.fsum(bits[op] * size[op] for op in ops)

    def cost(step: tuple[str, int]) -> float:
        """Noise added per bit saved (a lowering) or, negative, noise removed per bit spent (a raise)."""
        op, b = step
        return (noise[op][b] - noise[op][bits[op]]) / (size[op] * abs(bits[op] - b))

    while used() > budget:  # ends: every op at the narrowest candidate fits, as checked above
        op, b = min(((op, b) for op in ops for b in candidates if b < bits[op]), key=cost)
        bits[op] = b
    while True:
        room = budget - used()
        raises = [
            (op, b)
            for op in ops
            for b in candidates
            if b > bits[op] and size[op] * (b - bits[op]) <= room and noise[op][b] < noise[op][bits[op]]
        ]
        if not raises:
            return bits
        op, b = min(raises, key=cost)
        bits[op] = b
