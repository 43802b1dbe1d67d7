"""Random scores U(0, 1): the control every scorer must beat at the same density.

Scores depend only on (seed, document, layer, kv-head, position), never on which other
configs share the batch, so results do not depend on batching and thresholds nest: a key
kept at threshold 0.7 is kept at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press


@dataclass(frozen=True)
class RandomPress(Press):
    name = "random"
    default_thresholds = (0.5,)
    n_sink: int = 4
    seed: int = 0

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(
            hash((self.seed, ctx.doc_seed, ctx.layer, ctx.score_from)) & 0x7FFF_FFFF_FFFF_FFFF
        )
        b, h = ctx.keys.shape[:2]
        scores = torch.rand((h, ctx.end - ctx.score_from), generator=generator)
        return scores.to(ctx.keys.device).expand(b, -1, -1)
