"""Baseline: no compression. Every key scores +inf, so nothing is ever evicted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press, constant_scores
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class BaselinePress(Press):
    name = "baseline"
    constant_score = float("inf")

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        return constant_scores(ctx, float("inf"))
