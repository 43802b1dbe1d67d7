"""KeyDiff (Park et al., 2025, arXiv:2504.15364; kvpress KeyDiffPress): keep the keys least
similar to the mean key.

The anchor is the mean of the unit-normalised keys; a key's score is minus its cosine
similarity to it, so distinctive keys score high. Attention is not needed, which is the paper's
point (it runs with kernels that never materialise attention).

The paper evicts block by block against the anchor of what the cache holds; kvpress scores
the keys of one call. kvorch rescores every undecided key each chunk against the anchor of the
keys the config still holds (``LayerContext.kept``; the cosine does not depend on the anchor's
scale), so a key is judged by the cache it would stay in. On one chunk covering the document this is kvpress's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class KeyDiffPress(Press):
    name = "keydiff"
    default_thresholds = (-0.83,)  # about the median score on SmolLM2 (pydoc, 512 tokens)
    rescores = True
    reads_keys = True

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        held = ctx.positions < ctx.end  # [T]: keys that exist yet
        if ctx.kept is not None:  # and the config still holds
            held = held & ctx.kept
        unit = F.normalize(ctx.keys_at(ctx.positions).float(), dim=-1) * held[..., None].float()
        anchor = unit.sum(dim=2, keepdim=True)
        return -F.cosine_similarity(ctx.keys_at(ctx.scored).float(), anchor, dim=-1)
