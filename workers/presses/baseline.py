"""Baseline: no compression. Every key scores +inf, so nothing is ever evicted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import ChunkTensors, LayerContext, Press, constant_chunk_scores, constant_scores


@dataclass(frozen=True)
class BaselinePress(Press):
    name = "baseline"

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        return constant_scores(ctx, float("inf"))

    def score_chunk(self, ctx: ChunkTensors, state: None) -> torch.Tensor:
        return constant_chunk_scores(ctx, float("inf"))
