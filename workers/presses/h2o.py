"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023, arXiv:2306.14048).

Accumulated observed attention (sum, not mean: heavy hitters are the keys that gathered the
most attention mass), with a local window of recent tokens (512) always kept. The engine
treats that local window like the DMS window: keys are decided only when they leave it, and
it is reported as protected so the compressible density is not inflated by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.observed_attention import add_attention, attention_sums
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class H2OPress(Press):
    name = "h2o"
    default_thresholds = (1.0,)
    rescores = True
    needs_attention = True
    protected_window: int = 512

    def init_state(self, shape: StateShape) -> list[torch.Tensor]:
        return attention_sums(shape)

    def score(self, ctx: LayerContext, state: torch.Tensor) -> torch.Tensor:
        return add_attention(ctx, state)[:, :, ctx.scored]
