"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023, arXiv:2306.14048).

Accumulated observed attention (sum, not mean: heavy hitters are the keys that gathered the
most attention mass), with a local window of recent tokens (512) always kept. The engine
treats that local window like the DMS window: keys are decided only when they leave it, and
it is reported as protected so the compressible density is not inflated by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import ChunkTensors, LayerContext, Press, StateShape
from workers.presses.observed_attention import AttentionSums


@dataclass(frozen=True)
class H2OPress(Press):
    name = "h2o"
    default_thresholds = (1.0,)
    rescores = True
    needs_attention = True
    protected_window: int = 512

    def init_state(
        self, n_rows: int, n_layers: int, n_kv_heads: int, n_positions: int, device: torch.device
    ) -> AttentionSums:
        return AttentionSums.zeros(n_rows, n_layers, n_kv_heads, n_positions, device)

    def score(self, ctx: LayerContext, state: AttentionSums) -> torch.Tensor:
        return state.add(ctx)[:, :, ctx.score_from :].clone()

    def init_chunk_state(self, shape: StateShape) -> AttentionSums:
        return AttentionSums.zeros(shape.rows, shape.layers, shape.kv_heads, shape.positions, shape.device)

    def score_chunk(self, ctx: ChunkTensors, state: AttentionSums) -> torch.Tensor:
        return state.add_chunk(ctx)[:, :, ctx.scored]
