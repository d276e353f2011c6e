"""Every DVC output holding float results is a function of the inputs alone: the same bytes on another machine.

A machine is simulated by what changes PyTorch's CPU float path: the thread count, the ATen kernels' instruction set
(ATEN_CPU_CAPABILITY=default instead of AVX-512/AVX2), MKL's kernels (MKL_ENABLE_INSTRUCTIONS=AVX2) and oneDNN off.
tests/float_path.py runs the float-producing stages for demo-mini and demo-realtime under each; an fp32 canary (the
old reference's arithmetic) shows the path really changed, and every output must still be byte-identical. The
stable.py helpers and the exact metrics are tested below on their own.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, output_digests, run
from voxtral_coreml.numerics.metrics import compare_embeddings, psnr_db
from voxtral_coreml.numerics.stable import (
    FLOAT64_RESOLUTION_DB,
    STORED_BITS,
    exact_sum,
    resolved,
    round_significant,
    stored_float32,
)

FLOAT_PATH = Path(__file__).resolve().parent / "float_path.py"
# (environment before torch loads, threads, oneDNN): this machine as it is, and another one.
MACHINES = {
    "native": ({"OMP_NUM_THREADS": "2"}, 2, "on"),
    "other": ({"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1, "off"),
}
# Every kind of float-holding DVC output (paths under artifacts/).
OUTPUTS = (
    "reference/demo-mini/reference.safetensors",
    "reference/demo-mini/parity.json",
    "reference/demo-realtime/reference.safetensors",
    "reference/demo-realtime/parity.json",
    "metrics/streaming/demo-realtime/fp16-stateful-k1.json",
    "sensitivity/demo-mini/mixed.json",
    "metrics/demo-mini/fp16.json",
    "metrics/demo-mini/mixed.json",
    "metrics/mel/fp32.json",
    "mel/fp32/VoxtralMelSpectrogram.mlpackage/Data/com.apple.CoreML/model.mlmodel",
    "report.md",
    "tradeoff.png",
    "tradeoff/demo-mini.json",
)


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict[str, str]]]:
    """Per simulated machine: (what float_path.py printed, digests of artifacts/ less the inputs it was given: the
    extracted weights and the packages)."""
    setup = tmp_path_factory.mktemp("float-path") / "setup"
    setup.mkdir()
    run([sys.executable, str(FLOAT_PATH), "setup", str(REPO)], setup)
    results = {}
    for name, (env, threads, mkldnn) in MACHINES.items():
        work = setup.parent / name
        shutil.copytree(setup, work)
        printed = run([sys.executable, str(FLOAT_PATH), "run", str(threads), mkldnn], work, env=env).stdout
        outputs = {k: v for k, v in output_digests(work).items() if not k.startswith(("extracted/", "packages/"))}
        results[name] = (json.loads(printed.splitlines()[-1]), outputs)
    return results


def test_the_simulated_machine_changes_the_float_path(machines: dict) -> None:
    """fp32 results, as the old reference computed them, differ: the test can see a last-bit difference."""
    assert machines["native"][0]["canary"] != machines["other"][0]["canary"]
    assert machines["other"][0]["capability"] == "DEFAULT"


def test_every_float_output_is_byte_identical(machines: dict) -> None:
    native, other = machines["native"][1], machines["other"][1]
    assert set(OUTPUTS) <= set(native), sorted(native)
    assert native == other, sorted(k for k in native if native[k] != other.get(k))


def test_exact_sum_does_not_depend_on_order() -> None:
    values = np.random.default_rng(0).standard_normal(100_000) * 10.0 ** np.arange(-8, 8).repeat(6250)
    shuffled = np.random.default_rng(1).permutation(values)
    assert exact_sum(values) == exact_sum(shuffled) == math.fsum(values.tolist())
    assert float(np.sum(values)) != float(np.sum(shuffled))  # what a plain (pairwise, vectorized) sum does


def test_psnr_does_not_depend_on_order() -> None:
    rng = np.random.default_rng(2)
    ref = rng.standard_normal(50_000)
    cand = ref + 1e-3 * rng.standard_normal(50_000)
    order = rng.permutation(50_000)
    assert psnr_db(ref, cand) == psnr_db(ref[order], cand[order])


def test_stored_float32_is_a_grid_of_the_peak() -> None:
    t = torch.from_numpy(np.random.default_rng(3).standard_normal(10_000) * 3.0)
    step = math.ldexp(1.0, math.frexp(t.abs().max().item())[1] - STORED_BITS)
    stored = stored_float32(t)
    assert stored.dtype == torch.float32
    assert (stored.double() - t).abs().max().item() <= step / 2
    assert torch.equal(torch.round(stored.double() / step), stored.double() / step)  # every value on the grid
    nudged = t * (1 + 1e-15)  # another machine's float64 result
    assert (stored_float32(nudged) != stored).sum().item() <= 1  # ~1e-9 per value: in practice none


def test_float64_noise_is_below_the_resolution() -> None:
    """Two float64 computations of the same math compare equal at FLOAT64_RESOLUTION_DB; a real difference does not."""
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((375, 96)))
    noise = compare_embeddings(x, x * (1 + 1e-14), resolution_db=FLOAT64_RESOLUTION_DB)
    assert noise == {"psnr_db": FLOAT64_RESOLUTION_DB, "cosine_min": 1.0, "max_abs_err": 0.0}
    real = compare_embeddings(x, x + 1e-5, resolution_db=FLOAT64_RESOLUTION_DB)
    assert real["psnr_db"] < 120 and real["max_abs_err"] == 1e-5


def test_rounding_helpers() -> None:
    assert round_significant(0.0063891417, 3) == 0.00639
    assert round_significant(0.0, 3) == 0.0
    assert resolved(1e-12, 1e-10) == 0.0 and resolved(2e-10, 1e-10) == 2e-10
