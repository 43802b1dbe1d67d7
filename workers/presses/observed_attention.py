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


@dataclass
class AttentionSums:
    """Per layer, the attention each key has received so far: [rows, Hkv, n_positions]."""

    sums: list[torch.Tensor]

    @classmethod
    def zeros(
        cls, n_rows: int, n_layers: int, n_kv_heads: int, n_positions: int, device: torch.device
    ) -> AttentionSums:
        return cls([torch.zeros(n_rows, n_kv_heads, n_positions, device=device) for _ in range(n_layers)])

    def add(self, ctx: LayerContext) -> torch.Tensor:
        """Accumulate this chunk's attention (pad query rows are all zero); returns the running
        sums over the step's positions [B, Hkv, T]."""
        b, hkv, t = ctx.keys.shape[:3]
        received = ctx.attention.float().sum(dim=2).view(b, hkv, ctx.n_groups, t).mean(dim=2)
        total = self.sums[ctx.layer][:, :, :t]
        total += received
        return total


@register
@dataclass(frozen=True)
class ObservedAttentionPress(Press):
    name = "observed_attention"
    default_thresholds = (3e-3,)
    rescores = True
    needs_attention = True

    def init_state(self, shape: StateShape) -> AttentionSums:
        return AttentionSums.zeros(shape.rows, shape.layers, shape.kv_heads, shape.positions, shape.device)

    def score(self, ctx: LayerContext, state: AttentionSums) -> torch.Tensor:
        total = state.add(ctx)[:, :, ctx.scored]
        return total / (ctx.end - ctx.scored).clamp(min=1)
