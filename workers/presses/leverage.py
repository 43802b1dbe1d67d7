"""Leverage scores (Chari & Van Durme, 2025, "Compactor", arXiv:2507.08143; kvpress
LeverageScorePress): keep the keys that are outliers of the key space.

A key's statistical leverage is x_i^T (X^T X)^-1 x_i for the pre-RoPE keys X of the call,
centred over the call; the scores are z-normalised (mean 0, unit standard deviation over the
call's keys and kv-heads), so a threshold of 0 keeps the keys of above-average leverage.

Departures from kvpress, deliberate: kvpress approximates the leverage through a Gaussian
sketch of ``sketch_dimension`` (48) columns with a Cholesky jitter; kvorch computes it exactly
(the Gram matrix is head_dim x head_dim, small), with a ridge of 1e-6 of its mean eigenvalue so
a chunk with fewer keys than head_dim stays solvable. kvpress scores the keys of one call (a
prefill); kvorch the keys of each chunk against that chunk's keys, which is kvpress's score when
one chunk covers the document. Pre-RoPE keys come from unrotating the cached ones, so it needs
RoPE, as Expected Attention does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class LeverageScorePress(Press):
    name = "leverage"
    default_thresholds = (0.0,)
    reads_keys = True

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        keys = prerope_chunk_keys(ctx)
        return z_scores(leverage(keys, ctx.real_queries), ctx.real_queries)


def prerope_chunk_keys(ctx: LayerContext) -> torch.Tensor:
    """[B, Hkv, c, D] the chunk's keys before RoPE (the cache holds them rotated), in float64:
    a padded last chunk then sums to the same scores as an exact one (float32 differed by 1e-6)."""
    return ctx.rotary.unrotate(ctx.new_keys.double(), *ctx.rotary(ctx.query_positions))


def leverage(keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, c] exact leverage of keys [B, Hkv, c, D] among the rows where ``real`` [c] holds,
    the keys centred over those rows (0 elsewhere)."""
    weight = real.to(keys.dtype)[:, None]
    mean = (keys * weight).sum(dim=2, keepdim=True) / weight.sum().clamp(min=1)
    x = (keys - mean) * weight
    gram = x.transpose(-2, -1) @ x  # [B, Hkv, D, D]
    d = gram.shape[-1]
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    ridge = 1e-6 * torch.diagonal(gram, dim1=-2, dim2=-1).mean(dim=-1)[..., None, None] + 1e-12
    factor = torch.linalg.cholesky(gram + ridge * eye)
    solved = torch.cholesky_solve(x.transpose(-2, -1), factor)  # [B, Hkv, D, c] = G^-1 X^T
    return (x * solved.transpose(-2, -1)).sum(dim=-1).clamp(min=0)


def z_scores(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """scores [B, Hkv, c] minus their mean over every kv-head's real rows, over their (unbiased)
    standard deviation, per batch row: kvpress's z-normalisation of one call's scores."""
    mask = real.to(scores.dtype)
    count = mask.sum() * scores.shape[1]
    mean = (scores * mask).sum(dim=(1, 2), keepdim=True) / count.clamp(min=1)
    var = (((scores - mean) * mask) ** 2).sum(dim=(1, 2), keepdim=True) / (count - 1).clamp(min=1)
    return (scores - mean) / var.sqrt().clamp(min=1e-6)
