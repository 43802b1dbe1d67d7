"""The held cache of one press group at one layer: a pool of pages that every (row, kv-head) of
the group shares, each holding exactly what it keeps.

Why a pool: configs, layers and heads keep very different numbers of keys (a threshold's densest
head keeps every key while its mean one keeps a third; AdaKV moves a layer's budget between its
heads document by document). Slots per (row, kv-head) would all be sized for the densest one.
Here each layer has its own pool of ``pages`` pages of ``page`` slots, sized for what the whole
group holds in that layer, and each (row, kv-head) — an *owner*, ``row * kv_heads + head`` —
holds a segment of consecutive pages: its kept keys in position order, then room for the keys
written before the next decision. After each chunk's decisions the evicted keys leave and every
segment is laid out again from the new counts, so budgets move between heads freely; memory
follows the sum of what is kept, not its maximum.

Attention runs page by page: each page's keys against its owner's queries (one batched matmul
over the pool), with the softmax of an owner's pages combined from per-page maxima and sums, as
split-KV attention does. Its cost follows the pages in use, and it is one code path for every
shape: branch-free tensor code, no host syncs, static shapes (the pool's size is fixed per step).

Layout facts every function relies on (kept by :func:`_lay_out`): owners' segments are
contiguous and in owner order from page 0, unused pages come last (owner = ``owners``), and the
pool's (owner, position) keys are therefore sorted globally, so :func:`keys_at` is one
``searchsorted``. A pool too small for what its owners hold marks the rows whose writes fall past its
end ``overflow``: the engine then runs the document again with more pages, never keeping a row
computed from a dropped key (workers/engine/core.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import register_dataclass

from workers.modeling import attention
from workers.modeling.attention import AttentionVariant

# The position of an empty slot: larger than any query's, so causal masking hides it.
EMPTY = 1 << 40
# An owner's keys sort after every position of the owner before it (EMPTY < _OWNER_STRIDE).
_OWNER_STRIDE = 1 << 41


@dataclass
class PoolCache:
    """One layer's pool of one press group."""

    keys: torch.Tensor  # [pages, page, D] (the page size: workers/engine/capacity.py's page_size)
    values: torch.Tensor  # [pages, page, D]
    positions: torch.Tensor  # [pages, page] int64: EMPTY where nothing is held
    owner: torch.Tensor  # [pages] int64: whose segment the page is in; ``owners`` past the last
    first_page: torch.Tensor  # [owners] int64: where each owner's segment starts
    counts: torch.Tensor  # [rows, kv-heads] int64: keys held before the chunk


register_dataclass(PoolCache)


def allocate(
    n_pages: int,
    page: int,
    rows: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    write: int,
) -> PoolCache:
    """An empty pool of ``n_pages`` pages of ``page`` slots (workers/engine/capacity.py sizes
    both) for ``rows`` rows."""
    shape = (n_pages, page, head_dim)
    pool = PoolCache(
        keys=torch.zeros(shape, dtype=dtype, device=device),
        values=torch.zeros(shape, dtype=dtype, device=device),
        positions=torch.full(shape[:2], EMPTY, dtype=torch.int64, device=device),
        owner=torch.zeros(n_pages, dtype=torch.int64, device=device),
        first_page=torch.zeros(rows * kv_heads, dtype=torch.int64, device=device),
        counts=torch.zeros(rows, kv_heads, dtype=torch.int64, device=device),
    )
    _lay_out(pool, pool.counts, write)
    return pool


def clear(pool: PoolCache, write: int) -> None:
    """Empty the pool in place for a new document (a CUDA graph replays over the same tensors)."""
    pool.keys.zero_()
    pool.values.zero_()
    pool.positions.fill_(EMPTY)
    pool.counts.zero_()
    _lay_out(pool, pool.counts, write)


def _page(pool: PoolCache) -> int:
    return pool.positions.shape[1]


def _lay_out(pool: PoolCache, counts: torch.Tensor, write: int, bare_if_short: bool = False) -> None:
    """Give each owner the pages its ``counts`` [rows, kv-heads] keys and ``write`` more need, in
    owner order from page 0. Owners past the pool's end are caught by the next :func:`write`.
    ``bare_if_short`` (a growing pool): where the pool cannot give every owner that room, give
    each only its kept keys' pages (those always fit: they were in it), with no key lost; the
    pool then grows before the next write (ChunkStep.grow_pools reads the same need)."""
    page, n_pages = _page(pool), pool.owner.shape[0]
    per_owner = (counts.flatten() + write + page - 1) // page
    if bare_if_short:
        bare = (counts.flatten() + page - 1) // page
        per_owner = torch.where(per_owner.sum() <= n_pages, per_owner, bare)
    ends = per_owner.cumsum(0)
    pool.first_page.copy_(ends - per_owner)
    pool.owner.copy_(torch.searchsorted(ends, torch.arange(n_pages, device=counts.device), right=True))


def write(pool: PoolCache, key: torch.Tensor, value: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Write the chunk's keys/values [rows, kv-heads, c, D] right after what each owner holds
    (keeping its segment in position order); returns [rows] whether a row overflowed. A write
    past the pool is clamped onto its last slot and flagged (the document then runs again)."""
    rows, kv_heads, c, d = key.shape
    n_slots = pool.positions.numel()
    start = pool.first_page * _page(pool) + pool.counts.flatten()  # [owners]
    slot = start[:, None] + torch.arange(c, device=key.device)  # [owners, c]
    overflow = (slot >= n_slots).view(rows, kv_heads * c).any(dim=1)
    slot = slot.clamp(max=n_slots - 1).flatten()
    pool.keys.view(-1, d).index_copy_(0, slot, key.reshape(-1, d))
    pool.values.view(-1, d).index_copy_(0, slot, value.reshape(-1, d))
    pool.positions.view(-1).index_copy_(0, slot, query_positions.expand(rows * kv_heads, c).flatten())
    return overflow


def pages_in_use(pool: PoolCache, span: int, write: int) -> int:
    """Pages attention must read when no owner holds more than ``span`` positions (exact shapes
    cut the pool to them early in a document; static shapes read every page)."""
    owners = pool.first_page.shape[0]
    return min(pool.owner.shape[0], owners * (-(-(span + write) // _page(pool))))


def _page_inputs(
    pool: PoolCache, query: torch.Tensor, query_positions: torch.Tensor, variant: AttentionVariant, n_pages: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each page's owner's queries [pages, G, q, D], which of the page's keys each query sees
    [pages, q, page] (causal, sliding window, and only its owner's: the same for the G query heads
    of a kv-head), and the page's owner [pages] (``owners`` for a page no query row owns).
    ``query`` [rows, H, q, D] belongs to owners ``0 .. rows * kv_heads - 1``."""
    kv_heads = pool.counts.shape[1]
    rows, h, q, d = query.shape
    owners = rows * kv_heads
    owner = pool.owner[:n_pages].clamp(max=owners)
    page_queries = query.reshape(owners, h // kv_heads, q, d).index_select(0, owner.clamp(max=owners - 1))
    distance = query_positions[None, :, None] - pool.positions[:n_pages, None, :]  # [pages, q, page]
    seen = (distance >= 0) & (owner < owners)[:, None, None]
    if variant.sliding_window is not None:
        seen &= distance < variant.sliding_window
    return page_queries, seen, owner


def _logits(
    page_queries: torch.Tensor, keys: torch.Tensor, seen: torch.Tensor, scaling: float, variant: AttentionVariant
) -> torch.Tensor:
    """[pages, G, q, page] float32 logits, soft-capped, -inf where the query does not see the key."""
    return _masked_logits(page_queries, keys[:, None], seen[:, None], scaling, variant)


def _masked_logits(
    query: torch.Tensor, keys: torch.Tensor, seen: torch.Tensor, scaling: float, variant: AttentionVariant
) -> torch.Tensor:
    """float32 logits of ``query`` [..., Q, D] over ``keys`` [..., K, D], soft-capped, -inf where
    ``seen`` (broadcast to [..., Q, K]) says the query does not see the key."""
    logits = (query @ keys.transpose(-1, -2)).float() * scaling
    if variant.softcap is not None:
        logits = torch.tanh(logits / variant.softcap) * variant.softcap
    return logits.masked_fill(~seen, float("-inf"))


def _attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    seen: torch.Tensor,
    scaling: float,
    variant: AttentionVariant,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` [B, 1, Q, D] over ``keys``/``values`` [B, 1, K, D], ``seen`` (bool,
    broadcast to [B, 1, Q, K]) saying which keys each query sees: (output [B, Q, D] float32,
    log-sum-exp [B, Q] float32, -inf where a query sees nothing). On the CPU, without a
    soft-cap, PyTorch's fused flash kernel (the one SDPA runs, which also returns the
    log-sum-exp; it reads a mask broadcast over the queries as cheaply as none); elsewhere the
    plain math."""
    nothing = ~seen.any(dim=-1)  # broadcast to [B, 1, Q]
    if query.device.type == "cpu" and variant.softcap is None:
        bias = torch.zeros(seen.shape, dtype=query.dtype, device=seen.device).masked_fill(~seen, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, False, attn_mask=bias, scale=scaling
        )[:2]
        lse = lse.float().masked_fill(nothing, float("-inf"))  # the kernel reads 0 for a row that sees nothing
        return out.float()[:, 0], lse[:, 0]
    logits = _masked_logits(query, keys, seen, scaling, variant)
    lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is seen
    weights = torch.exp(logits - torch.where(lse.isfinite(), lse, 0.0)[..., None])  # 0 where unseen
    return (weights.to(values.dtype) @ values).float()[:, 0], lse[:, 0]


def attend(
    pool: PoolCache,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    variant: AttentionVariant,
    n_pages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` [rows, H, c, D] over what its owners held before the chunk, in the
    first ``n_pages`` pages, and over the chunk's own ``key``/``value`` [rows, kv-heads, c, D]:
    (output [rows, H, c, D], log-sum-exp [owners, G*c] float32, for probabilities later).
    Each segment was laid out with room for at least the chunk's c keys: its whole pages of room
    hold nothing from before the chunk, so they are left out (only pages of earlier keys are read).

    Split so that no mask depends on the query where it need not: a page's held keys all precede
    the chunk, so (outside a sliding window) every query of its owner sees the same ones, and
    the page is one attention with a mask over its keys alone; the chunk's causal mask is one
    [c, c] pattern shared by every owner. The G query heads of a kv-head are folded into one
    block of G*c queries (keys read once, not per head). The parts are combined per owner by
    their log-sum-exp, as split-KV attention does. ``rows`` may be fewer than the pool's (a
    shared chunk's one row): other owners' pages are not read by any query."""
    rows, h, c, d = query.shape
    kv_heads = pool.counts.shape[1]
    owners, groups = rows * kv_heads, h // kv_heads
    folded = query.reshape(owners, groups * c, d)
    owner = pool.owner[:n_pages].clamp(max=owners)  # ``owners``: a page no query row owns
    keys, values, positions = pool.keys[:n_pages], pool.values[:n_pages], pool.positions[:n_pages]
    # Every segment ends in at least c // page pages of room: at most ``reads`` pages hold a key
    # from before the chunk (a page does iff its first slot does: kept keys come first).
    reads = min(n_pages, pool.owner.shape[0] - pool.first_page.shape[0] * (c // _page(pool)))
    if reads < n_pages:
        earlier = (positions[:, 0] < query_positions[:1]) & (owner < owners)
        read = torch.sort((~earlier).to(torch.uint8), stable=True).indices[:reads]  # those pages first
        owner, keys, values, positions = (t.index_select(0, read) for t in (owner, keys, values, positions))
    held = (positions < query_positions[:1]) & (owner < owners)[:, None]  # [pages, page]
    if variant.sliding_window is None:
        seen = held[:, None, None, :]  # every query of the owner sees the same keys
    else:
        distance = query_positions.repeat(groups)[None, :, None] - positions[:, None, :]  # [pages, G*c, page]
        seen = (held[:, None, :] & (distance < variant.sliding_window))[:, None]
    page_queries = folded.index_select(0, owner.clamp(max=owners - 1))[:, None]  # [pages, 1, G*c, D]
    page_out, page_lse = _attention(
        page_queries, keys[:, None], values[:, None], seen, scaling, variant
    )  # [pages, G*c, D], [pages, G*c]
    causal = attention.band(query_positions, query_positions, variant).repeat(groups, 1)  # [G*c, c]
    chunk_out, chunk_lse = _attention(
        folded[:, None], key.reshape(owners, 1, c, d), value.reshape(owners, 1, c, d), causal, scaling, variant
    )  # [owners, G*c, D], [owners, G*c]: finite (each query sees its own key)
    best = torch.cat([chunk_lse, chunk_lse.new_full((1, chunk_lse.shape[1]), float("-inf"))])
    best = best.scatter_reduce(0, owner[:, None].expand_as(page_lse), page_lse, "amax")  # [owners + 1, G*c]
    shift = torch.where((owner < owners)[:, None], best.index_select(0, owner), 0.0)  # finite
    page_weights = torch.exp(page_lse - shift)  # 0 where the page shows nothing
    chunk_weights = torch.exp(chunk_lse - best[:owners])
    sums = torch.cat([chunk_weights, torch.zeros_like(chunk_weights[:1])]).index_add_(0, owner, page_weights)
    total = torch.cat([chunk_out * chunk_weights[..., None], torch.zeros_like(chunk_out[:1])])
    total.index_add_(0, owner, page_out * page_weights[..., None])
    out = (total[:owners] / sums[:owners, :, None]).to(query.dtype)
    lse = best[:owners] + torch.log(sums[:owners])
    return out.reshape(rows, h, c, d), lse


def probabilities(
    pool: PoolCache,
    query: torch.Tensor,
    query_positions: torch.Tensor,
    lse: torch.Tensor,
    scaling: float,
    variant: AttentionVariant,
    n_pages: int,
    n_positions: int,
) -> torch.Tensor:
    """Attention probabilities [rows, H, q, n_positions] of ``query`` [rows, H, q, D] (a subset of
    a chunk's queries, ``lse`` [owners, G*q] their log-sum-exp from :func:`attend`) over
    positions: zero for a key the owner does not hold."""
    rows, h, q, _ = query.shape
    kv_heads = pool.counts.shape[1]
    owners, groups = rows * kv_heads, h // kv_heads
    page_queries, seen, owner = _page_inputs(pool, query, query_positions, variant, n_pages)
    logits = _logits(page_queries, pool.keys[:n_pages], seen, scaling, variant).flatten(1, 2)
    lse_of_page = lse.index_select(0, owner.clamp(max=owners - 1))  # [pages, G*q]
    probs = torch.exp(logits - lse_of_page[..., None])  # 0 where unseen
    row_of_query = owner[:, None] * (groups * q) + torch.arange(groups * q, device=query.device)  # [pages, G*q]
    at = row_of_query[..., None] * n_positions + pool.positions[:n_pages, None, :].clamp(max=n_positions - 1)
    flat = probs.new_zeros((owners + 1) * groups * q * n_positions)
    flat.index_add_(0, at.flatten(), probs.flatten())
    return flat[: owners * groups * q * n_positions].view(rows, h, q, n_positions)


def keys_at(pool: PoolCache, tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the pool's keys or values) at ``positions`` [S] for every owner: [rows,
    kv-heads, S, D], zero where the owner no longer holds the key (an evicted one: its score is
    never read again)."""
    rows, kv_heads = pool.counts.shape
    owners = rows * kv_heads
    sorted_keys = (pool.owner[:, None] * _OWNER_STRIDE + pool.positions).flatten()  # sorted (see module doc)
    wanted = torch.arange(owners, device=positions.device)[:, None] * _OWNER_STRIDE + positions  # [owners, S]
    slot = torch.searchsorted(sorted_keys, wanted.flatten()).clamp(max=sorted_keys.shape[0] - 1)
    found = sorted_keys.index_select(0, slot) == wanted.flatten()
    picked = tensor.view(-1, tensor.shape[-1]).index_select(0, slot) * found[:, None].to(tensor.dtype)
    return picked.view(rows, kv_heads, positions.shape[0], -1)


def compact(pool: PoolCache, keep: torch.Tensor, span: int, write: int, grows: bool = False) -> None:
    """After the chunk's decisions: drop the keys ``keep`` [rows, kv-heads, span] (per position)
    evicted, lay the segments out again for what each owner now holds, and move the kept keys
    there in position order. Kept keys that no longer fit are lost, but only where the next
    :func:`write` of their owner also falls past the pool, which flags the row: the document
    then runs again, and no row computed after the loss is kept. A growing pool (``grows``)
    loses none: short of room for the next write, it lays out the kept keys alone and grows."""
    rows, kv_heads = pool.counts.shape
    owners = rows * kv_heads
    page = _page(pool)
    positions = pool.positions.flatten()
    owner = pool.owner[:, None].expand(-1, page).flatten()  # [slots] (a copy: the layout changes)
    held = (positions < EMPTY) & (owner < owners)
    at = owner.clamp(max=owners - 1) * span + positions.clamp(max=span - 1)
    stays = keep.flatten().index_select(0, at) & held
    counts = torch.zeros(owners + 1, dtype=torch.int64, device=keep.device).index_add_(0, owner, stays.long())
    counts = counts[:owners].view(rows, kv_heads)
    _lay_out(pool, counts, write, bare_if_short=grows)
    _move(pool, pool, stays, owner, counts)
    pool.counts.copy_(counts)


def _move(source: PoolCache, target: PoolCache, stays: torch.Tensor, owner: torch.Tensor, counts: torch.Tensor) -> None:
    """Move the keys ``stays`` [source slots] of ``source`` (whose slot's owner is ``owner``) to
    ``target``'s segments as laid out for ``counts``, in the order they are in (position order
    within an owner); every other slot of ``target`` is emptied. ``source`` may be ``target``."""
    owners = counts.numel()
    n_slots = target.positions.numel()
    before = counts.flatten().cumsum(0) - counts.flatten()  # kept keys of the owners before each
    rank = stays.long().cumsum(0) - 1 - before.index_select(0, owner.clamp(max=owners - 1))
    slot = target.first_page.index_select(0, owner.clamp(max=owners - 1)) * _page(target) + rank
    slot = torch.where(stays, slot.clamp(max=n_slots), n_slots)  # the rest to a spare slot
    for into, tensor, fill in (
        (target.keys, source.keys, 0), (target.values, source.values, 0), (target.positions, source.positions, EMPTY)
    ):  # fmt: skip
        flat = tensor.view(tensor.shape[0] * tensor.shape[1], -1)
        moved = torch.full((n_slots + 1, flat.shape[1]), fill, dtype=flat.dtype, device=flat.device)
        moved.index_copy_(0, slot, flat)
        into.view(n_slots, -1).copy_(moved[:n_slots])


def pages_needed(pool: PoolCache, write: int) -> torch.Tensor:
    """0-d: the pages the pool's owners need to hold what they hold now plus ``write`` keys each."""
    page = _page(pool)
    return ((pool.counts + write + page - 1) // page).sum()


def grown(pool: PoolCache, n_pages: int, write: int) -> PoolCache:
    """A copy of ``pool`` with ``n_pages`` pages, its segments laid out again with room for
    ``write`` keys each (the last compaction may have left them none)."""
    rows, kv_heads = pool.counts.shape
    owners = rows * kv_heads
    keys = pool.keys
    page = _page(pool)
    larger = allocate(n_pages, page, rows, kv_heads, keys.shape[-1], keys.dtype, keys.device, write)
    _lay_out(larger, pool.counts, write)
    owner = pool.owner[:, None].expand(-1, page).flatten()
    stays = (pool.positions.flatten() < EMPTY) & (owner < owners)
    _move(pool, larger, stays, owner, pool.counts)
    larger.counts.copy_(pool.counts)
    return larger
