"""LagKV (Liang et al., 2025, arXiv:2504.04704; kvpress LagKVPress): lag-relative statistics
of keys and values, no attention needed.

After the ``n_sink`` sinks the document is cut into partitions of ``lag_size`` positions. A key
of partition p is judged against the next partition (its "lag" reference): each feature is
min-max scaled by the reference's range, and the spread (standard deviation over features) of
the scaled key, softmaxed over its partition, is its key score; the same for its value; the
score is their mean. As in kvpress (without ``cross_scoring``) the score is then the key's rank
inside its partition divided by ``lag_size``: a threshold of 0.5 keeps the top half of every
partition. A key whose reference partition is not complete yet scores +inf (kvpress keeps that
tail whole).

kvorch rescores every undecided key each chunk, so a key is judged once its reference has
arrived: the local window this press protects, ``protected_window`` = 256 by default, is
2 x ``lag_size``, the span after which every key's reference is complete (a smaller one judges
the keys whose reference is not complete as kept). Under the ratio and budget policies the
reference is the keys of the next partition the config still holds (``LayerContext.kept``), and
the softmax is over the partition's held keys (an evicted one takes the partition's lowest rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.presses.base import LayerContext, Press
from workers.presses.registry import register


@register
@dataclass(frozen=True)
class LagKVPress(Press):
    name = "lagkv"
    default_thresholds = (0.5,)
    rescores = True
    reads_keys = True
    n_sink: int = 4
    lag_size: int = 128
    protected_window: int = 256

    def __post_init__(self) -> None:
        if self.lag_size < 2:
            raise ValueError(f"lagkv: lag_size must be >= 2, got {self.lag_size}")

    def score(self, ctx: LayerContext, state: None) -> torch.Tensor:
        positions, size = ctx.positions, self.lag_size
        n_parts = max(positions.shape[0] - self.n_sink, 0) // size + 3  # partitions (+ sinks, + one spare)
        part = torch.div(positions - self.n_sink, size, rounding_mode="floor")  # [T]: -1 for the sinks
        index = (part + 1).clamp(min=0)  # [T]: 0 for the sinks, p + 1 for partition p
        keys = ctx.keys_at(positions).float()
        held = (positions >= self.n_sink) & (positions < ctx.end)  # [T]
        held = (held & ctx.kept if ctx.kept is not None else held).expand(keys.shape[:3])  # [B, Hkv, T]
        complete = (positions >= self.n_sink) & (self.n_sink + (part + 2) * size <= ctx.end)  # [T]
        members = complete & held  # [B, Hkv, T]: the held keys of complete partitions
        key_score = _partition_softmax(_lag_spread(keys, index, held, n_parts), index, members, n_parts)
        values = ctx.values_at(positions).float()
        value_score = _partition_softmax(_lag_spread(values, index, held, n_parts), index, members, n_parts)
        spread = torch.where(members, (key_score + value_score) / 2, -1.0)  # evicted keys rank lowest
        # rank inside the partition: sort by score, then (stably) by partition, so partition p
        # takes the ranks n_sink + p * size onward
        order = torch.sort(spread, dim=-1, stable=True).indices
        order = order.gather(-1, torch.sort(index.expand_as(spread).gather(-1, order), dim=-1, stable=True).indices)
        rank = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))
        in_partition = (rank - self.n_sink - part * size).float() / size
        return torch.where(complete, in_partition, float("inf"))[:, :, ctx.scored]


def _lag_spread(x: torch.Tensor, index: torch.Tensor, held: torch.Tensor, n_parts: int) -> torch.Tensor:
    """[B, Hkv, T]: std over features of x [B, Hkv, T, D] min-max scaled by the range of the
    next partition's held entries (garbage where that partition is not complete)."""
    b, h, t, d = x.shape
    big = torch.finfo(x.dtype).max
    at = index[None, None, :, None].expand(b, h, t, d)
    shape = (b, h, n_parts, d)
    low = x.new_full(shape, big).scatter_reduce(2, at, torch.where(held[..., None], x, big), "amin")
    high = x.new_full(shape, -big).scatter_reduce(2, at, torch.where(held[..., None], x, -big), "amax")
    reference = (index + 1).clamp(max=n_parts - 1)
    low, high = low.index_select(2, reference), high.index_select(2, reference)
    return ((x - low) / (high - low)).std(dim=-1)


def _partition_softmax(x: torch.Tensor, index: torch.Tensor, members: torch.Tensor, n_parts: int) -> torch.Tensor:
    """[B, Hkv, T]: softmax of x over each partition's ``members`` (0 elsewhere)."""
    x = torch.where(members, x, 0.0)
    at = index.expand_as(x)
    shape = (*x.shape[:2], n_parts)
    peak = x.new_full(shape, -torch.inf).scatter_reduce(2, at, x, "amax")
    e = torch.where(members, torch.exp(x - peak.gather(2, at)), 0.0)
    return e / x.new_zeros(shape).scatter_add(2, at, e).gather(2, at).clamp(min=torch.finfo(x.dtype).tiny)
