"""How many keys a config's cache keeps room for: the one place the held cache is sized.

The held cache (workers/engine/pool.py) gives each press group, per layer, a pool of pages that
its (row, kv-head)s share: per row, what the policy can keep in the layer once a chunk is
decided, summed over the kv-heads, plus the keys written before the next decision. That bound
follows from the policy where the policy fixes it (a budget, a ratio and its allocation, a press
that keeps only its protected window, one that keeps everything) and is learned from the
documents already run where the keys' scores decide it (the threshold policy, per layer): the
engine then grows it when a document overflows it and runs that document again, so no key the
policy keeps is ever dropped.

This module imports no torch, so the driver's batch-size estimate (workers/contract/memory.py) and the
fit check of the benches size the cache with the very rule the step allocates by.
"""

from __future__ import annotations

import math

from workers.contract.settings import POOL_PAGE_SIZES

# Room a learned bound leaves above what the scores kept in the densest document so far, so that
# documents a little denser than the ones before still fit without a rerun.
LEARNED_MARGIN = 1.25
MIN_PAGE, MAX_PAGE = POOL_PAGE_SIZES
# A static step's pools are rounded up to m x 2^k pages, m in 8..15: at most 1.125x the need, and
# a handful of sizes per octave, so a compiled length bucket meets few shapes (each its own graph).
_MANTISSAS = tuple(range(8, 16))


def policy_bound(
    policy: str,
    keep_fraction: float,
    budget: int | None,
    threshold: float | None,
    constant_score: float | None,
    floor: int,
    n: int,
) -> int | None:
    """Most keys one (layer, kv-head) can hold once a chunk ending at or before ``n`` is decided,
    or None where the scores decide it (the threshold policy of a press that scores).

    ``floor``: the sinks plus the widest protected window, always kept. ``constant_score``: the
    score a structural press gives every key (+inf keeps all, -inf keeps only the floor).
    Under the ranked policies the limit is workers/engine/decisions.py's ``keep_limit`` at ``n``
    (it only grows with the chunk's end) or the floor, whichever is larger: the uniform
    allocation's; workers/engine/sizing.py moves it between heads and layers as the others do.
    """
    if policy in ("ratio", "budget"):
        limit = math.ceil(keep_fraction * n) if policy == "ratio" else min(n, budget or n)
        return min(n, max(limit, floor))
    tau = 0.0 if threshold is None else threshold
    if tau == -math.inf or constant_score == math.inf:
        return n
    if constant_score == -math.inf or tau == math.inf:
        return min(n, floor)
    return None


def learned_bound(density: float, floor: int, n: int) -> int:
    """A threshold config's bound from the densest fraction of a document it held so far: the
    floor, always kept, plus the margin on what the scores kept beyond it."""
    return min(n, floor + math.ceil(LEARNED_MARGIN * max(0.0, density * n - floor)))


def page_size(keys_held: int, owners: int, write: int, min_pages: int = 4) -> int:
    """Slots per page of a pool whose ``owners`` (row, kv-head)s hold ``keys_held`` keys in all
    and ``write`` more each before a decision: the largest power of two from MIN_PAGE to MAX_PAGE
    that an owner's mean need fills ``min_pages`` times, so the half page an owner wastes on
    average is at most 1 / (2 x min_pages) of it, while a pool of long segments reads few pages
    (attention pays per page). A static step's pools ask 8 (their learned margin and rounding
    already hold more), the others 4."""
    mean = (keys_held + owners * write) // max(1, owners)
    page = MIN_PAGE
    while 2 * page <= min(MAX_PAGE, mean // min_pages):
        page *= 2
    return page


def pages_for(keys_held: int, kv_heads: int, write: int, page: int) -> int:
    """Pages of ``page`` slots a row's pool needs in one layer when its kv-heads hold
    ``keys_held`` keys in all: each head's keys plus the ``write`` written before the next
    decision, in whole pages (each head's segment starts on a page: the sum of each head's
    ceil((held + write) / page) is at most the floor of the sum of (held + write + page - 1) /
    page)."""
    return (keys_held + kv_heads * (write + page - 1)) // page


def rounded(pages: int) -> int:
    """``pages`` rounded up to m x 2^k (m in 8..15) for a static step: at most 1.125x."""
    if pages <= _MANTISSAS[0]:
        return pages
    octave = 1 << max(0, pages.bit_length() - 4)  # pages / octave is in [8, 16)
    return next(m for m in (*_MANTISSAS, 16) if m * octave >= pages) * octave
