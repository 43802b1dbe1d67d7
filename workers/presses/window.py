"""Sliding window only, no sinks (control A of the head-aware ablation).

Every key scores -inf, so a key is evicted as soon as it leaves the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press, constant_scores
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class WindowPress(Press):
    name = "window"
    constant_score = float("-inf")

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        return constant_scores(ctx, float("-inf"))
