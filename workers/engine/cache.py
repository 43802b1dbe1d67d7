"""The KV cache of a batch of configs: per layer, one block of slots per *band* of batch rows.

A band is consecutive press groups whose configs hold about as many keys (workers/engine/
capacity.py sizes it): every (row, kv-head) of it has ``slots`` places for keys. Two kinds:

- **full** (``slots`` = the cache length): slot i holds position i, every position of the
  document stays, and what a config evicted is masked out of attention by its keep-mask. The
  masked cache (``--cache masked``) is one full band; under the held cache the bands of configs
  that keep everything (the baseline, the agreement's reference row) are full too.
- **held** (fewer slots): slots hold, in position order, the keys the config still holds (kept,
  or not decided yet) and then the chunk being written; the rest are empty (position ``EMPTY``,
  after every query, so no query sees them). After each chunk's decisions the evicted keys leave
  and the slots are compacted, so attention runs over the slots and its cost follows what the
  config keeps. A (row, kv-head) whose keys would not fit marks the row ``overflow``; the engine
  then grows the band and runs the document again (workers/engine/core.py).

The keep-mask and the scores stay per position (a byte and a float per key, against 2 x head_dim
values): the rules of workers/engine/decisions.py read them as before, for every band alike.
Everything here is branch-free tensor code with static shapes: no host syncs, no recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import register_dataclass

from workers.modeling import attention
from workers.modeling.attention import AttentionVariant

# The position of an empty slot: larger than any query's, so causal masking hides it.
EMPTY = 1 << 40


@dataclass(frozen=True)
class Band:
    """Batch rows ``rows`` (consecutive press groups) with ``slots`` slots per (layer, kv-head)."""

    rows: slice
    slots: int
    full: bool  # slot i is position i (slots = the cache length): no compaction

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass
class BandCache:
    """One layer's tensors of one band. ``positions``/``counts`` are None for a full band."""

    keys: torch.Tensor  # [R, Hkv, slots, D]
    values: torch.Tensor  # [R, Hkv, slots, D]
    positions: torch.Tensor | None = None  # [R, Hkv, slots] int64, EMPTY where nothing is held
    counts: torch.Tensor | None = None  # [R, Hkv] int64: keys held before the chunk


register_dataclass(BandCache)


def allocate(band: Band, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> BandCache:
    shape = (band.size, kv_heads, band.slots, head_dim)
    keys, values = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
    if band.full:
        return BandCache(keys, values)
    positions = torch.full(shape[:3], EMPTY, dtype=torch.int64, device=device)
    return BandCache(keys, values, positions, torch.zeros(shape[:2], dtype=torch.int64, device=device))


def select_rows(cache: BandCache, rows: slice) -> BandCache:
    """Views of the band's ``rows``."""
    tensors = (cache.keys, cache.values, cache.positions, cache.counts)
    return BandCache(*(None if t is None else t[rows] for t in tensors))


def first_row(cache: BandCache) -> BandCache:
    """The band's first row alone (a shared chunk: every row holds the same keys)."""
    return select_rows(cache, slice(0, 1))


def clear(cache: BandCache) -> None:
    """Empty the band in place for a new document (a CUDA graph replays over the same tensors)."""
    cache.keys.zero_()
    cache.values.zero_()
    if cache.positions is not None:
        cache.positions.fill_(EMPTY)
        cache.counts.zero_()


def write(
    cache: BandCache, key: torch.Tensor, value: torch.Tensor, query_positions: torch.Tensor
) -> torch.Tensor | None:
    """Write the chunk's keys/values [R, Hkv, c, D] and return [R] whether a row overflowed
    (None for a full band, which cannot).

    A full band writes at the positions themselves; a held one right after the keys it holds,
    which keeps its slots in position order. Writes past the last slot are clamped onto it and
    mark the row overflowed (the document is then run again with more slots, never kept)."""
    if cache.positions is None:
        cache.keys.index_copy_(2, query_positions, key)
        cache.values.index_copy_(2, query_positions, value)
        return None
    n_slots, c = cache.keys.shape[2], query_positions.shape[0]
    slot = cache.counts[..., None] + torch.arange(c, device=key.device)  # [R, Hkv, c]
    overflow = (slot >= n_slots).any(dim=(1, 2))
    slot = slot.clamp(max=n_slots - 1)
    along = slot[..., None].expand(-1, -1, -1, key.shape[-1])
    cache.keys.scatter_(2, along, key)
    cache.values.scatter_(2, along, value)
    cache.positions.scatter_(2, slot, query_positions.expand_as(slot))
    return overflow


def visible(
    cache: BandCache,
    keep: torch.Tensor,
    pattern: torch.Tensor,
    query_positions: torch.Tensor,
    span: int,
    variant: AttentionVariant,
) -> torch.Tensor:
    """[R, Hkv, c, S] which of the first S slots each query sees (S = :func:`span_of`).

    A full band: the keep-mask ``keep`` [R, Hkv, span] of its positions and the causal band
    ``pattern`` [c, span] shared by every row. A held band: the causal band of each slot's own
    position (every key it holds is kept or undecided, and empty slots lie after every query)."""
    if cache.positions is None:
        return keep[:, :, None, :] & pattern
    n = span_of(cache, span)
    distance = query_positions[:, None] - cache.positions[:, :, None, :n]  # [R, Hkv, c, S]
    seen = distance >= 0
    if variant.sliding_window is not None:
        seen &= distance < variant.sliding_window
    return seen


def span_of(cache: BandCache, span: int) -> int:
    """Slots attention reads: every slot, or fewer while the document is shorter (exact shapes)."""
    return min(cache.keys.shape[2], span)


def keys_at(cache: BandCache, tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the band's keys or values) at ``positions`` [S]: [R, Hkv, S, D], zero where
    the band no longer holds the key (an evicted one: its score is never read again)."""
    if cache.positions is None:
        return tensor.index_select(2, positions)
    held = cache.positions
    wanted = positions.expand(*held.shape[:2], -1).contiguous()
    slot = torch.searchsorted(held, wanted).clamp(max=held.shape[2] - 1)  # slots are in position order
    found = held.gather(2, slot) == wanted
    picked = tensor.gather(2, slot[..., None].expand(-1, -1, -1, tensor.shape[-1]))
    return picked * found[..., None].to(picked.dtype)


def to_positions(positions: torch.Tensor | None, probs: torch.Tensor, n_positions: int) -> torch.Tensor:
    """Attention probabilities over slots [R, H, q, S] as probabilities over positions
    [R, H, q, n_positions] (zero for keys not held), for presses that read them by position.
    ``positions``: the slots' positions [R, Hkv, slots] of a held band, None for a full one."""
    if positions is None:
        return probs
    r, h, q, n = probs.shape
    hkv = positions.shape[1]
    held = positions[:, :, :n].clamp(max=n_positions - 1)  # empty slots have probability 0
    index = held[:, :, None, None, :].expand(r, hkv, h // hkv, q, n).reshape(r, h, q, n)
    return probs.new_zeros(r, h, q, n_positions).scatter_add_(-1, index, probs)


def compact(cache: BandCache, keep: torch.Tensor, span: int) -> None:
    """After the chunk's decisions: drop the keys ``keep`` [R, Hkv, span] (per position) evicted,
    move the rest to the first slots in position order, and count them."""
    if cache.positions is None:
        return
    n = span_of(cache, span)
    positions = cache.positions[:, :, :n]
    held = positions < EMPTY
    stays = keep.gather(2, positions.clamp(max=span - 1)) & held
    order = torch.argsort((~stays).to(torch.uint8), dim=-1, stable=True)  # kept first, in order
    along = order[..., None].expand(-1, -1, -1, cache.keys.shape[-1])
    keys, values = cache.keys[:, :, :n], cache.values[:, :, :n]
    keys.copy_(keys.gather(2, along))
    values.copy_(values.gather(2, along))
    positions.copy_(torch.where(stays.gather(2, order), positions.gather(2, order), EMPTY))
    cache.counts.copy_(stays.sum(dim=-1))


def attend(
    cache: BandCache,
    query: torch.Tensor,
    seen: torch.Tensor,
    scaling: float,
    backend: str,
    variant: AttentionVariant,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The band's attention over its first S slots (``seen`` [R, Hkv, c, S]): output
    [R, H, c, D] and, when the eager math ran, probabilities over slots [R, H, c, S]."""
    n = seen.shape[-1]
    keys, values = cache.keys[:, :, :n], cache.values[:, :, :n]
    return attention.grouped_attention(query, keys, values, seen, scaling, backend, variant)
