"""How many keys a config's cache keeps room for: the one place the held cache is sized.

The held cache (workers/engine/cache.py) gives every (config, layer, kv-head) a fixed number of
slots: what the policy can keep once a chunk is decided, plus the chunk being written. That bound
follows from the policy where the policy fixes it (a budget, a ratio, a press that keeps only its
protected window, one that keeps everything) and is learned from the documents already run where
the keys' scores decide it (the threshold policy): the engine then grows it when a document
overflows it and runs that document again, so no key the policy keeps is ever dropped.

This module imports no torch, so the driver's batch-size estimate (workers/contract/memory.py) and the
fit check of the benches size the cache with the very rule the step allocates by.
"""

from __future__ import annotations

import math

# Room a learned bound leaves above the densest (layer, kv-head) seen so far, so that documents a
# little denser than the ones before still fit without a rerun.
LEARNED_MARGIN = 1.25
# Slots are rounded up to m x 2^k, m in 4..7: at most 1.25x the need, and a handful of sizes per
# octave, so a compiled length bucket meets few capacities (each one is its own graph).
_MANTISSAS = (4, 5, 6, 7)


def policy_bound(
    policy: str,
    keep_fraction: float,
    budget: int | None,
    threshold: float | None,
    constant_score: float | None,
    floor: int,
    n: int,
    peak_share: float | None = 1.0,
) -> int | None:
    """Most keys one (layer, kv-head) can hold once a chunk ending at or before ``n`` is decided,
    or None where the scores decide it (the threshold policy of a press that scores).

    ``floor``: the sinks plus the widest protected window, always kept. ``constant_score``: the
    score a structural press gives every key (+inf keeps all, -inf keeps only the floor).
    Under the ranked policies the limit is workers/engine/decisions.py's ``keep_limit`` at ``n``
    (it only grows with the chunk's end) times the allocation's ``peak_share`` (the most one
    head gets, as a multiple of the uniform limit: workers/contract/allocation.py), or the floor,
    whichever is larger; None where the scores share the limit between heads (adakv).
    """
    if policy in ("ratio", "budget"):
        if peak_share is None:
            return None
        limit = math.ceil(keep_fraction * n) if policy == "ratio" else min(n, budget or n)
        return min(n, max(math.ceil(limit * peak_share), floor))
    tau = 0.0 if threshold is None else threshold
    if tau == -math.inf or constant_score == math.inf:
        return n
    if constant_score == -math.inf or tau == math.inf:
        return min(n, floor)
    return None


def learned_bound(density: float, floor: int, n: int) -> int:
    """A threshold config's bound from the densest fraction of a document it held so far."""
    return min(n, floor + math.ceil(LEARNED_MARGIN * density * n))


def slots(bound: int | None, chunk: int, n_positions: int) -> int:
    """Slots per (layer, kv-head): the bound plus one chunk, rounded up to m x 2^k (m in 4..7),
    at most the cache length (both execution paths alike). None (nothing known yet) holds every
    position."""
    if bound is None:
        return n_positions
    need = bound + chunk
    if need <= 4:
        return min(n_positions, need)
    octave = 1 << max(0, need.bit_length() - 3)  # need / octave is in [4, 8)
    m = next((m for m in _MANTISSAS if m * octave >= need), 8)
    return min(n_positions, m * octave)
