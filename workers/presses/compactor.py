"""Compactor (Chari & Van Durme, 2025, arXiv:2507.08143; kvpress CompactorPress): leverage
scores of the pre-RoPE keys blended with non-causal attention.

Over the keys of a call minus its first ``n_sink`` (8) and last ``sink_size_end`` positions:
``blending`` x the z-scored leverage (workers/presses/leverage.py) plus the z-scored
non-causal attention score, which is, as kvpress's NonCausalAttnPress computes it, the attention
every query of the call gives each key with no causal mask and no 1/sqrt(d) scaling, summed
over the queries, averaged over the GQA group, times ||v||, then average-pooled over 3
positions (zero-padded). The positions left out score +inf, as kvpress pads them with the maximum.

Departures from kvpress, deliberate: the non-causal attention is tiled by kvorch's chunks (one
tile per chunk) instead of kvpress's ``chunk_size`` tiles; ``sink_size_end`` is 0 by default,
since the DMS window already protects the most recent keys and a +inf at every chunk's end would
keep those keys for good (kvpress's 4 apply once per prefill); ``blending`` is 0.35, kvpress's
value when no compression ratio tells it (kvpress blends by the ratio when one is given); the
leverage is exact instead of sketched. Sinks are the document's first positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.presses.base import LayerContext, Press
from workers.presses.leverage import leverage, prerope_chunk_keys, z_scores
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class CompactorPress(Press):
    name = "compactor"
    default_thresholds = (0.0,)
    reads_keys = True
    n_sink: int = 8
    sink_size_end: int = 0
    blending: float = 0.35

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        qpos = ctx.query_positions
        inner = ctx.real_queries & (qpos >= self.n_sink) & (qpos < ctx.end - self.sink_size_end)  # [c]
        geometry = z_scores(leverage(prerope_chunk_keys(ctx), inner), inner)
        attended = z_scores(non_causal_attention(ctx, inner), inner)
        return torch.where(inner, self.blending * geometry + attended, float("inf"))


def non_causal_attention(ctx: LayerContext, inner: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, c]: kvpress's non-causal attention score of the chunk's ``inner`` keys among
    themselves (unscaled logits, summed over queries, GQA mean, times ||v||, pooled over 3)."""
    groups = ctx.n_groups
    keys = ctx.new_keys.double().repeat_interleave(groups, dim=1)  # [B, H, c, D]; float64 as the leverage
    logits = (ctx.queries.double() @ keys.transpose(-2, -1)).masked_fill(~inner, -1e30)
    received = (torch.softmax(logits, dim=-1) * inner[:, None].double()).sum(dim=2)  # [B, H, c]
    b, h, c = received.shape
    received = received.view(b, ctx.kv_heads, groups, c).mean(dim=2) * ctx.new_values.double().norm(dim=-1)
    return F.avg_pool1d(received * inner.double(), kernel_size=3, stride=1, padding=1)
