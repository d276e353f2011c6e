"""How close embeddings are to a reference: the numbers every validation reports."""

from __future__ import annotations

import math

import torch

PSNR_CAP_DB = 999.0  # identical outputs: a finite number keeps the metrics valid JSON


def psnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """20·log10(max|ref| / rmse), the gate used by Apple's and Argmax's converters."""
    ref, cand = reference.double().reshape(-1), candidate.double().reshape(-1)
    rmse = (ref - cand).pow(2).mean().sqrt().item()
    peak = ref.abs().max().item()
    if not math.isfinite(rmse):  # NaN or Inf in either: as far from the reference as it gets
        return -PSNR_CAP_DB
    return PSNR_CAP_DB if rmse == 0 else min(PSNR_CAP_DB, 20 * math.log10(peak / rmse))


def compare_embeddings(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """PSNR, the worst per-embedding cosine similarity, and the largest absolute error."""
    ref = reference.double().reshape(-1, reference.shape[-1])
    cand = candidate.double().reshape(-1, candidate.shape[-1])
    if ref.shape != cand.shape:
        raise ValueError(f"embedding shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    cosine = torch.nn.functional.cosine_similarity(ref, cand, dim=1)
    return {
        "psnr_db": round(psnr_db(ref, cand), 3),
        "cosine_min": round(cosine.min().item(), 6),
        "max_abs_err": float(f"{(ref - cand).abs().max().item():.6g}"),
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
