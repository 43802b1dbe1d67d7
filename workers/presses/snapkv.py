"""SnapKV (Li et al., 2024, arXiv:2404.14469; kvpress SnapKVPress conventions).

A key's score is the attention it receives from an observation window of the most recent
queries (the chunk's last ``window_size``), averaged over those queries, smoothed along
positions with a zero-padded average pool of ``kernel_size``, then averaged over the GQA group.
As in kvpress, only the keys before the observation window are pooled: the window's own columns
are cut first, so their large (mostly diagonal) attention does not leak into the scores of the
``kernel_size // 2`` keys just before the window, and those edge keys see zeros beyond it. Keys
of the observation window itself score +inf (kvpress gives them the maximum score). Rescored
every chunk, so a key is judged by the latest observation window before it leaves the DMS window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class SnapKVPress(Press):
    name = "snapkv"
    default_thresholds = (0.001,)
    rescores = True
    needs_attention = True
    window_size: int = 64
    kernel_size: int = 5

    @property
    def attention_queries(self) -> int:
        return self.window_size

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"snapkv: window_size must be >= 1, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv: kernel_size must be odd and >= 1, got {self.kernel_size}")

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        b, hkv, n = ctx.rows, ctx.kv_heads, ctx.positions.shape[0]
        n_observers = torch.minimum(ctx.end - ctx.start, torch.tensor(self.window_size, device=ctx.end.device))
        first_observer = ctx.end - n_observers
        before_window = ctx.positions < first_observer
        observed = ctx.attention.float().sum(dim=2) / n_observers  # [B, H, N]; non-observer rows are zero
        observed = torch.where(before_window, observed, 0.0)  # the window's own columns are cut, as in kvpress
        pooled = F.avg_pool1d(observed, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        scores = torch.where(before_window, pooled.view(b, hkv, ctx.n_groups, n).mean(dim=2), float("inf"))
        return scores[:, :, ctx.scored]
