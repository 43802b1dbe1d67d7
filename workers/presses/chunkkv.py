"""ChunkKV (Liu et al., 2025, arXiv:2502.00299; kvpress ChunkKVPress): keep whole chunks of
consecutive keys, ranked by their scorer's summed score, so the kept context stays readable.

A wrapper: ``press=NAME`` (default snapkv) scores every key; the document's positions are cut
into chunks of ``chunk_length`` (20) absolute positions, and every key of a chunk, in every
kv-head, scores the mean over the chunk's keys and the kv-heads of that score (kvpress sums over
heads and averages over the chunk: the same ranking; the mean keeps the scorer's threshold scale).
A chunk that is not complete yet averages the keys it has, as kvpress's remainder does.

kvpress keeps the top ``(1 - ratio)`` of chunks in one call; under kvorch's ratio and budget
policies the engine keeps the highest scores per kv-head, which keeps whole chunks but may cut
the last one kept (a budget is in keys, not chunks). The wrapper rescores every undecided key
each chunk (it keeps its scorer's latest score of every position), so a chunk is judged once its
keys have arrived when the protected window is at least ``chunk_length``. Sinks and the local
window are the wrapper's own ``n_sink`` and ``protected_window`` fields, not the scorer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press, StateShape
from workers.presses.registry import register
from workers.presses.wrapping import WrapperPress, latest_scores, score_into


@register
@dataclass(frozen=True)
class ChunkKVPress(WrapperPress, Press):
    name = "chunkkv"
    rescores = True
    reads_keys = True
    press: str = "snapkv"
    chunk_length: int = 20

    def __post_init__(self) -> None:
        if self.chunk_length < 1:
            raise ValueError(f"chunkkv: chunk_length must be >= 1, got {self.chunk_length}")
        super().__post_init__()

    def init_state(self, shape: StateShape) -> list[tuple]:
        inner = self.inner.init_state(shape) or [None] * shape.layers
        return [(entry, latest_scores(shape)) for entry in inner]

    def score(self, ctx: LayerContext, state: tuple) -> torch.Tensor:
        inner_state, latest = state
        score_into(self.inner, ctx, inner_state, latest)
        positions = ctx.positions
        real = positions < ctx.end
        chunk = torch.div(positions, self.chunk_length, rounding_mode="floor")  # [T]
        n_chunks = (positions.shape[0] - 1) // self.chunk_length + 1
        per_key = torch.where(real, latest[:, :, : positions.shape[0]].mean(dim=1), 0.0)  # [B, T]
        sums = per_key.new_zeros(per_key.shape[0], n_chunks).scatter_add(1, chunk.expand_as(per_key), per_key)
        counts = per_key.new_zeros(n_chunks).scatter_add(0, chunk, real.float()).clamp(min=1)
        means = (sums / counts).index_select(1, chunk.index_select(0, ctx.scored))  # [B, S]
        return means[:, None].expand(-1, ctx.kv_heads, -1)
