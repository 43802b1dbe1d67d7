"""Key norm (Devoto et al., 2024, arXiv:2406.11430): keys with a small L2 norm draw more
attention, so the score is -||k||. RoPE is a rotation, so pre- and post-RoPE norms agree."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class KnormPress(Press):
    name = "knorm"
    default_thresholds = (-16.0,)
    reads_keys = True

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        return -ctx.new_keys.float().norm(dim=-1)
