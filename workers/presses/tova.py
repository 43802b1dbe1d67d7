"""TOVA, Token Omission Via Attention (Oren et al., 2024, arXiv:2401.06104; kvpress TOVAPress).

A key's score is the attention the most recent query gives it, averaged over all query heads
(so every kv-head gets the same score), re-scored every chunk. The most recent query's own key
scores +inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class TOVAPress(Press):
    name = "tova"
    default_thresholds = (0.0005,)
    rescores = True
    needs_attention = True
    attention_queries = 1

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        hkv = ctx.kv_heads
        last = ctx.attention[:, :, -1].float().mean(dim=1)  # [B, N]: the last real query
        last = torch.where(ctx.positions == ctx.end - 1, float("inf"), last)
        return last[:, None, ctx.scored].expand(-1, hkv, -1)
