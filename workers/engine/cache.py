"""The KV cache of a batch of configs: per layer, one block per *band* of batch rows.

Two kinds of band:

- **full** (:class:`Band`): slot i holds position i, every position of the document stays, and
  what a config evicted is masked out of attention by its keep-mask. The masked cache
  (``--cache masked``, and FlexAttention, whose block mask reads positions) is one full band;
  under the held cache the rows that keep everything (the baseline, the agreement's reference
  row) are full bands too.
- **held** (:class:`PoolBand`): one press group whose rows hold only what they keep, in a pool
  of pages per layer that every (row, kv-head) of the group shares (workers/engine/pool.py):
  memory and attention follow what each (row, layer, kv-head) keeps.

The keep-mask and the scores stay per position (a byte and a float per key, against 2 x head_dim
values): the rules of workers/engine/decisions.py read them as before, for every band alike.
Everything here is branch-free tensor code with static shapes: no host syncs, no recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import register_dataclass

from workers.engine import pool
from workers.modeling import attention
from workers.modeling.attention import AttentionVariant


@dataclass(frozen=True)
class Band:
    """Batch rows ``rows`` (consecutive press groups) holding every position: slot i is position i."""

    rows: slice
    slots: int  # the cache length

    full = True

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass(frozen=True)
class PoolBand:
    """One press group's rows ``rows`` in a pool per layer: ``allotted[layer][row]`` pages each
    row is sized for (what its memory is), ``pages[layer]`` the pool's pages (their sum, or more
    where static shapes round it), ``page`` slots each, ``write`` the most keys a (row, kv-head)
    writes between two decisions."""

    rows: slice
    allotted: tuple[tuple[int, ...], ...]
    pages: tuple[int, ...]
    page: int
    write: int
    # Sized before a threshold config of it ever ran: it starts small and grows between chunks
    # to what its rows hold (exact shapes; ChunkStep.grow_pools).
    grows: bool = False

    full = False

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass
class BandCache:
    """One layer's tensors of one full band."""

    keys: torch.Tensor  # [R, Hkv, slots, D]
    values: torch.Tensor  # [R, Hkv, slots, D]


register_dataclass(BandCache)

LayerCache = BandCache | pool.PoolCache


def allocate(
    band: Band | PoolBand, layer: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> LayerCache:
    if isinstance(band, PoolBand):
        return pool.allocate(band.pages[layer], band.page, band.size, kv_heads, head_dim, dtype, device, band.write)
    shape = (band.size, kv_heads, band.slots, head_dim)
    return BandCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


def clear(layer_cache: LayerCache, band: Band | PoolBand) -> None:
    """Empty the band in place for a new document (a CUDA graph replays over the same tensors)."""
    if isinstance(layer_cache, pool.PoolCache):
        pool.clear(layer_cache, band.write)
        return
    layer_cache.keys.zero_()
    layer_cache.values.zero_()


def first_row(layer_cache: BandCache) -> BandCache:
    """The band's first row alone (a shared chunk: every row holds the same keys)."""
    return BandCache(layer_cache.keys[:1], layer_cache.values[:1])


def write(layer_cache: BandCache, key: torch.Tensor, value: torch.Tensor, query_positions: torch.Tensor) -> None:
    """Write the chunk's keys/values [R, Hkv, c, D] at their positions."""
    layer_cache.keys.index_copy_(2, query_positions, key)
    layer_cache.values.index_copy_(2, query_positions, value)


def attend(
    layer_cache: BandCache,
    query: torch.Tensor,
    seen: torch.Tensor,
    scaling: float,
    backend: str,
    variant: AttentionVariant,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The band's attention over its first S positions (``seen`` [R, Hkv, c, S]: the keep-mask
    and the causal band): output [R, H, c, D] and, when the eager math ran, probabilities
    [R, H, c, S]."""
    n = seen.shape[-1]
    keys, values = layer_cache.keys[:, :, :n], layer_cache.values[:, :, :n]
    return attention.grouped_attention(query, keys, values, seen, scaling, backend, variant)


def keys_at(layer_cache: BandCache, tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the band's keys or values) at ``positions`` [S]: [R, Hkv, S, D]."""
    return tensor.index_select(2, positions)
