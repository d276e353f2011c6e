"""How close embeddings are to a reference: the numbers every validation reports.

Computed exactly from the values (float64, exact sums: stable.py), so that the same inputs give the same metrics
on any machine, and stored at the precision they mean: PSNR to 0.01 dB, cosine to 1e-6, errors to 3 digits.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .stable import as_float64_array, exact_row_sums, exact_sum, resolved, round_decimals, round_significant

PSNR_CAP_DB = 999.0  # identical outputs: a finite number keeps the metrics valid JSON
PSNR_DECIMALS = 2  # 0.01 dB: far finer than any gate or comparison between recipes
COSINE_DECIMALS = 6
ERROR_DIGITS = 3
COSINE_EPS = 1e-8  # a norm below it counts as this (torch.nn.functional.cosine_similarity's eps): zero rows give 0


def psnr_db(reference: torch.Tensor | np.ndarray, candidate: torch.Tensor | np.ndarray) -> float:
    """20·log10(max|ref| / rmse), the gate used by Apple's and Argmax's converters (unrounded)."""
    ref, cand = as_float64_array(reference), as_float64_array(candidate)
    diff = ref - cand
    mse = exact_sum(diff * diff) / diff.size
    if not math.isfinite(mse):  # NaN or Inf in either: as far from the reference as it gets
        return -PSNR_CAP_DB
    peak = float(np.abs(ref).max())
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 20 * math.log10(peak / math.sqrt(mse)))


def cosine_min(ref: np.ndarray, cand: np.ndarray) -> float:
    """The worst cosine similarity between matching rows of two [N, C] float64 arrays."""
    rows = zip(exact_row_sums(ref * cand), exact_row_sums(ref * ref), exact_row_sums(cand * cand), strict=True)
    return min(dot / (max(math.sqrt(a), COSINE_EPS) * max(math.sqrt(b), COSINE_EPS)) for dot, a, b in rows)


def compare_embeddings(
    reference: torch.Tensor, candidate: torch.Tensor, resolution_db: float | None = None
) -> dict[str, float]:
    """PSNR, the worst per-embedding cosine similarity, and the largest absolute error, rounded.

    `resolution_db`: for two computations of the same math, whose difference is rounding noise: PSNR is capped
    there and errors below the peak at that PSNR are 0, so the noise of one machine never reaches the result."""
    if reference.shape[-1] != candidate.shape[-1] or reference.numel() != candidate.numel():
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    width = reference.shape[-1]
    ref, cand = as_float64_array(reference).reshape(-1, width), as_float64_array(candidate).reshape(-1, width)
    psnr, max_abs_err = psnr_db(ref, cand), float(np.abs(ref - cand).max())
    if resolution_db is not None:
        psnr = min(psnr, resolution_db)
        max_abs_err = resolved(max_abs_err, float(np.abs(ref).max()) * 10 ** (-resolution_db / 20))
    return {
        "psnr_db": round_decimals(psnr, PSNR_DECIMALS),
        "cosine_min": round_decimals(cosine_min(ref, cand), COSINE_DECIMALS),
        "max_abs_err": round_significant(max_abs_err, ERROR_DIGITS),
    }


TOKEN_COSINE = 0.98  # an embedding this close to the reference's carries the same content


def token_cosine_stats(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """compare_embeddings plus how the per-embedding cosines spread: median, 1st percentile, share >= 0.98."""
    ref = reference.double().reshape(-1, reference.shape[-1])
    cosine = torch.nn.functional.cosine_similarity(ref, candidate.double().reshape(ref.shape), dim=1)
    return {
        **compare_embeddings(reference, candidate),
        "cosine_median": round(cosine.median().item(), 4),
        "cosine_p01": round(cosine.quantile(0.01).item(), 4),
        f"share_ge_{TOKEN_COSINE}": round((cosine >= TOKEN_COSINE).double().mean().item(), 4),
    }
