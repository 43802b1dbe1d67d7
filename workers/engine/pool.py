"""The held cache of one press group at one layer: a pool of pages that every (row, kv-head) of
the group shares, each holding exactly what it keeps.

Why a pool: configs, layers and heads keep very different numbers of keys (a threshold's densest
head keeps every key while its mean one keeps a third; AdaKV moves a layer's budget between its
heads document by document). Slots per (row, kv-head) would all be sized for the densest one.
Here each layer has its own pool of ``pages`` pages of ``PAGE`` slots, sized for what the whole
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

from workers.engine.capacity import PAGE
from workers.modeling.attention import AttentionVariant

# The position of an empty slot: larger than any query's, so causal masking hides it.
EMPTY = 1 << 40
# An owner's keys sort after every position of the owner before it (EMPTY < _OWNER_STRIDE).
_OWNER_STRIDE = 1 << 41


@dataclass
class PoolCache:
    """One layer's pool of one press group."""

    keys: torch.Tensor  # [pages, PAGE, D]
    values: torch.Tensor  # [pages, PAGE, D]
    positions: torch.Tensor  # [pages, PAGE] int64: EMPTY where nothing is held
    owner: torch.Tensor  # [pages] int64: whose segment the page is in; ``owners`` past the last
    first_page: torch.Tensor  # [owners] int64: where each owner's segment starts
    counts: torch.Tensor  # [rows, kv-heads] int64: keys held before the chunk


register_dataclass(PoolCache)


def allocate(
    n_pages: int, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, write: int
) -> PoolCache:
    """An empty pool of ``n_pages`` pages (workers/engine/capacity.py sizes it) for ``rows`` rows."""
    shape = (n_pages, PAGE, head_dim)
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


def _lay_out(pool: PoolCache, counts: torch.Tensor, write: int) -> None:
    """Give each owner the pages its ``counts`` [rows, kv-heads] keys and ``write`` more need, in
    owner order from page 0. Owners past the pool's end are caught by the next :func:`write`."""
    per_owner = (counts.flatten() + write + PAGE - 1) // PAGE
    ends = per_owner.cumsum(0)
    pool.first_page.copy_(ends - per_owner)
    n_pages = pool.owner.shape[0]
    page = torch.arange(n_pages, device=counts.device)
    pool.owner.copy_(torch.searchsorted(ends, page, right=True))


def write(pool: PoolCache, key: torch.Tensor, value: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Write the chunk's keys/values [rows, kv-heads, c, D] right after what each owner holds
    (keeping its segment in position order); returns [rows] whether a row overflowed. A write
    past the pool is clamped onto its last slot and flagged (the document then runs again)."""
    rows, kv_heads, c, d = key.shape
    n_slots = pool.positions.numel()
    start = pool.first_page * PAGE + pool.counts.flatten()  # [owners]
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
    return min(pool.owner.shape[0], owners * (-(-(span + write) // PAGE)))


def _page_inputs(
    pool: PoolCache, query: torch.Tensor, query_positions: torch.Tensor, variant: AttentionVariant, n_pages: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each page's owner's queries [pages, G, q, D], which of the page's keys each query sees
    [pages, q, PAGE] (causal, sliding window, and only its owner's: the same for the G query heads
    of a kv-head), and the page's owner [pages] (``owners`` for a page no query row owns).
    ``query`` [rows, H, q, D] belongs to owners ``0 .. rows * kv_heads - 1``."""
    kv_heads = pool.counts.shape[1]
    rows, h, q, d = query.shape
    owners = rows * kv_heads
    owner = pool.owner[:n_pages].clamp(max=owners)
    page_queries = query.reshape(owners, h // kv_heads, q, d).index_select(0, owner.clamp(max=owners - 1))
    distance = query_positions[None, :, None] - pool.positions[:n_pages, None, :]  # [pages, q, PAGE]
    seen = (distance >= 0) & (owner < owners)[:, None, None]
    if variant.sliding_window is not None:
        seen &= distance < variant.sliding_window
    return page_queries, seen, owner


def _logits(
    page_queries: torch.Tensor, keys: torch.Tensor, seen: torch.Tensor, scaling: float, variant: AttentionVariant
) -> torch.Tensor:
    """[pages, G, q, PAGE] float32 logits, soft-capped, -inf where the query does not see the key."""
    logits = (page_queries @ keys[:, None].transpose(-1, -2)).float() * scaling
    if variant.softcap is not None:
        logits = torch.tanh(logits / variant.softcap) * variant.softcap
    return logits.masked_fill(~seen[:, None], float("-inf"))


def _page_attention(
    page_queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    seen: torch.Tensor,
    scaling: float,
    variant: AttentionVariant,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each page's attention on its own: (output [pages, G, q, D] float32, log-sum-exp [pages, G,
    q], -inf where the page shows the query nothing). On the CPU, without a soft-cap, PyTorch's
    fused flash kernel (the one SDPA runs, which also returns the log-sum-exp: about 3x the plain
    math's speed); elsewhere the plain math."""
    if page_queries.device.type == "cpu" and variant.softcap is None:
        pages, groups, _, d = page_queries.shape
        bias = torch.zeros(seen.shape, dtype=page_queries.dtype, device=seen.device).masked_fill(~seen, float("-inf"))
        size = (pages, groups, keys.shape[1], d)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            page_queries, keys[:, None].expand(size), values[:, None].expand(size), 0.0, False,
            attn_mask=bias[:, None], scale=scaling,
        )  # fmt: skip
        return out.float(), torch.where(seen.any(dim=-1)[:, None], lse.float(), float("-inf"))
    logits = _logits(page_queries, keys, seen, scaling, variant)
    lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is seen
    weights = torch.exp(logits - torch.where(lse.isfinite(), lse, 0.0)[..., None])  # 0 where unseen
    return weights.to(values.dtype) @ values[:, None], lse


def attend(
    pool: PoolCache,
    query: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    variant: AttentionVariant,
    n_pages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` [rows, H, c, D] over what its owners hold in the first ``n_pages``
    pages: (output [rows, H, c, D], log-sum-exp [owners, G*c] float32, for probabilities later).
    Each page attends on its own; an owner's pages are then combined by their log-sum-exp, as
    split-KV attention does. ``rows`` may be fewer than the pool's (a shared chunk's one row):
    other owners' pages are not read by any query."""
    rows, h, c, d = query.shape
    owners = rows * pool.counts.shape[1]
    page_queries, seen, owner = _page_inputs(pool, query, query_positions, variant, n_pages)
    outs, page_lse = _page_attention(
        page_queries, pool.keys[:n_pages], pool.values[:n_pages], seen, scaling, variant
    )
    outs, page_lse = outs.flatten(1, 2), page_lse.flatten(1)  # [pages, G*c, D], [pages, G*c]
    best = torch.full((owners + 1, page_lse.shape[1]), float("-inf"), device=query.device)
    best = best.scatter_reduce(0, owner[:, None].expand_as(page_lse), page_lse, "amax")
    shift = torch.where(owner[:, None] < owners, best.index_select(0, owner), 0.0)  # finite
    weights = torch.exp(page_lse - shift)  # [pages, G*c]: 0 where the page shows nothing
    sums = torch.zeros_like(best).index_add_(0, owner, weights)
    total = torch.zeros(owners + 1, page_lse.shape[1], d, device=query.device)
    total.index_add_(0, owner, outs * weights[..., None])
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


def compact(pool: PoolCache, keep: torch.Tensor, span: int, write: int) -> None:
    """After the chunk's decisions: drop the keys ``keep`` [rows, kv-heads, span] (per position)
    evicted, lay the segments out again for what each owner now holds, and move the kept keys
    there in position order. Kept keys that no longer fit are lost, but only where the next
    :func:`write` of their owner also falls past the pool, which flags the row: the document
    then runs again, and no row computed after the loss is kept."""
    rows, kv_heads = pool.counts.shape
    owners = rows * kv_heads
    n_slots = pool.positions.numel()
    positions = pool.positions.flatten()
    owner = pool.owner[:, None].expand(-1, PAGE).flatten()  # [slots]
    held = (positions < EMPTY) & (owner < owners)
    at = owner.clamp(max=owners - 1) * span + positions.clamp(max=span - 1)
    stays = keep.flatten().index_select(0, at) & held
    counts = torch.zeros(owners + 1, dtype=torch.int64, device=keep.device).index_add_(0, owner, stays.long())
    counts = counts[:owners].view(rows, kv_heads)
    _lay_out(pool, counts, write)
    before = counts.flatten().cumsum(0) - counts.flatten()  # kept keys of the owners before each
    rank = stays.long().cumsum(0) - 1 - before.index_select(0, owner.clamp(max=owners - 1))
    target = pool.first_page.index_select(0, owner.clamp(max=owners - 1)) * PAGE + rank
    target = torch.where(stays, target.clamp(max=n_slots), n_slots)  # the rest to a spare slot
    for tensor, fill in ((pool.keys, 0), (pool.values, 0), (pool.positions, EMPTY)):
        flat = tensor.view(n_slots, -1) if tensor.dim() == 3 else tensor.view(n_slots, 1)
        moved = torch.full((n_slots + 1, flat.shape[1]), fill, dtype=flat.dtype, device=flat.device)
        moved.index_copy_(0, target, flat)
        flat.copy_(moved[:n_slots])
    pool.counts.copy_(counts)


def pages_needed(pool: PoolCache, write: int) -> torch.Tensor:
    """0-d: the pages the pool's owners need to hold what they hold now plus ``write`` keys each."""
    return ((pool.counts + write + PAGE - 1) // PAGE).sum()


def grown(pool: PoolCache, n_pages: int, write: int) -> PoolCache:
    """A copy of ``pool`` with ``n_pages`` pages: its segments, laid out from page 0, stay where
    they are, and the new pages come last, unused."""
    rows, kv_heads = pool.counts.shape
    keys = pool.keys
    larger = allocate(n_pages, rows, kv_heads, keys.shape[-1], keys.dtype, keys.device, write)
    used = pool.owner.shape[0]
    for target, source in ((larger.keys, pool.keys), (larger.values, pool.values), (larger.positions, pool.positions)):
        target[:used].copy_(source)
    larger.counts.copy_(pool.counts)
    larger.first_page.copy_(pool.first_page)  # as the last compaction laid them out
    larger.owner[:used].copy_(pool.owner)
    larger.owner[used:] = larger.first_page.shape[0]  # unused
    return larger
