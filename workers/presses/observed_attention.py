"""Observed attention: the mean attention a key received from the queries that saw it.

score(j) = (1 / #queries that saw j) * sum over those queries of A[t, j], averaged over the
query heads of the kv-head's GQA group (kvpress ObservedAttentionPress conventions). No sinks.
Until a key is decided it is visible to every later query, so the count is ``end - j``.
The attention probabilities come from the engine under any backend, not from eager mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import register


def attention_sums(shape: StateShape) -> list[torch.Tensor]:
    """Per layer, the attention each key has received so far: [rows, Hkv, n_positions]."""
    return [torch.zeros(shape.rows, shape.kv_heads, shape.positions, device=shape.device) for _ in range(shape.layers)]


def add_attention(ctx: LayerContext, sums: torch.Tensor) -> torch.Tensor:
    """Accumulate this chunk's attention (pad query rows are all zero) into the layer's ``sums``;
    returns the running sums over the step's positions [B, Hkv, T]."""
    b, hkv, t = ctx.rows, ctx.kv_heads, ctx.positions.shape[0]
    received = ctx.attention.float().sum(dim=2).view(b, hkv, ctx.n_groups, t).mean(dim=2)
    total = sums[:, :, :t]
    total += received
    return total


@register
@dataclass(frozen=True)
class ObservedAttentionPress(Press):
    name = "observed_attention"
    default_thresholds = (3e-3,)
    rescores = True
    needs_attention = True

    def init_state(self, shape: StateShape) -> list[torch.Tensor]:
        return attention_sums(shape)

    def score(self, ctx: LayerContext, state: torch.Tensor) -> torch.Tensor:
        total = add_attention(ctx, state)[:, :, ctx.scored]
        return total / (ctx.end - ctx.scored).clamp(min=1)
