"""The keep rules: which of a row group's keys stay in the cache once scored.

Written once, as branch-free tensor code over the positions the step attends over (``span``:
the document so far uncompiled, the whole length bucket compiled), so the same lines run in
every execution path (docs/DESIGN.md, "The evaluation protocol"). Every chunk-dependent bound
is a 0-d tensor: nothing here syncs with the host or specializes a compiled graph per chunk.
"""

from __future__ import annotations

import torch


def leaving_window(
    positions: torch.Tensor, start: torch.Tensor, end: torch.Tensor, window: int | torch.Tensor
) -> torch.Tensor:
    """The keys that leave a protected window of ``window`` keys during chunk [start, end):
    [start - w, end - w). [T] for one window, [kv-heads, T] for ``window`` [kv-heads, 1]."""
    return (positions >= start - window) & (positions < end - window)


def decide_by_threshold(
    keep: torch.Tensor, scores: torch.Tensor, leaving: torch.Tensor, thresholds: torch.Tensor, sinks: torch.Tensor
) -> None:
    """Keys leaving their head's protected window this chunk (``leaving``, :func:`leaving_window`)
    are kept for good iff score >= threshold; ``sinks`` (the document's first positions) always are.

    ``keep`` [rows, kv-heads, T] is written in place; ``scores`` the same shape; ``thresholds``
    [rows, 1, 1]. A key is decided exactly once, in the chunk that moves it out of its window.
    """
    decision = (scores >= thresholds) | sinks
    keep.copy_(torch.where(leaving, decision, keep))


def keep_limit(keep_fraction: torch.Tensor, budgets: torch.Tensor, end: int | torch.Tensor) -> torch.Tensor:
    """Keys each row may hold per (layer, kv-head) once [0, end) is seen: ceil((1 - r) * end)
    under the ratio policy, the token budget B under the budget policy. [rows] int64.

    Each row carries both (``keep_fraction`` 1 under budget, ``budgets`` unbounded under ratio),
    so one formula serves a group of either policy with no branch on the host.
    """
    return torch.minimum(torch.ceil(keep_fraction * end).long(), budgets)


def decide_by_budget(
    keep: torch.Tensor,
    scores: torch.Tensor,
    positions: torch.Tensor,
    end: torch.Tensor,
    window: int,
    limit: torch.Tensor,
    n_sink: int,
    first_stage: tuple[float, torch.Tensor] | None = None,
) -> None:
    """Keep the best-scoring keys so kept <= ``limit`` per (layer, kv-head): [rows] for every
    kv-head alike (:func:`keep_limit`: the ratio or token-budget policy), or [rows, kv-heads]
    for a limit per head (an allocation's, workers/engine/allocation.py).

    Sinks and the protected window ([end - window, end)) are always kept and count toward the
    budget; the rest of it goes to the highest scores among keys still kept in [n_sink, end -
    window), since evictions are final. Ties go to the earlier position: ranks come from a stable
    sort by score, then a stable sort that moves positions outside the range last.

    ``first_stage`` (share, first_scores), CriticalKV's first stage (kvpress
    ``CriticalKVPress.first_stage_ratio``): the top floor(share x limit) competing keys by
    ``first_scores`` go first, less the sinks and window, which count toward it as toward the
    limit (as AdaKV's safeguard in :func:`decide_by_layer_budget`); the rest by ``scores``.
    """
    protected, in_range = _competing(positions, end, window, n_sink)
    allowed = (limit - protected).clamp(min=0)  # [rows] or [rows, kv-heads]
    candidate = in_range & keep
    ranked = torch.where(candidate, scores, float("-inf"))
    tier = (~candidate).to(torch.uint8).expand_as(ranked)
    if first_stage is not None:
        share, first_scores = first_stage
        first = (torch.floor(share * limit.double()).long() - protected).clamp(min=0)
        first_scores = first_scores[..., : scores.shape[-1]]  # a press's buffer may outlast the span
        by_first = _ranks(torch.where(candidate, first_scores, float("-inf")), tier)
        chosen = candidate & (by_first < first.view(first.shape[0], -1, 1))
        tier = torch.where(chosen, 0, torch.where(candidate, 1, 2)).to(torch.uint8)
    rank = _ranks(ranked, tier)
    keep.copy_(keep & ((rank < allowed.view(allowed.shape[0], -1, 1)) | ~in_range))


def decide_by_layer_budget(
    keep: torch.Tensor,
    scores: torch.Tensor,
    positions: torch.Tensor,
    end: torch.Tensor,
    window: int,
    limit: torch.Tensor,
    n_sink: int,
    alpha_safeguard: float,
) -> None:
    """AdaKV's rule (kvpress ``AdaKVPress``) over one layer's ``keep`` [rows, kv-heads, T]: the
    layer's budget, ``limit`` [rows] per head summed over its kv-heads, goes to the highest scores
    across all of them, after each head has kept its own best floor(alpha_safeguard x limit) keys.

    As in :func:`decide_by_budget`, a head's sinks and protected window always stay and count
    toward its budget and toward its safeguard, and only keys still kept in [n_sink, end -
    window) compete. Ties go to the lower kv-head, then the earlier position.
    """
    rows, heads, span = keep.shape
    protected, in_range = _competing(positions, end, window, n_sink)
    pool = (limit - protected).clamp(min=0) * heads  # [rows]: what the layer's heads share
    safe = (torch.floor(alpha_safeguard * limit.double()).long() - protected).clamp(min=0)  # [rows]
    candidate = in_range & keep
    ranked = torch.where(candidate, scores, float("-inf"))
    in_head = _ranks(ranked, (~candidate).to(torch.uint8))
    forced = candidate & (in_head < safe.view(-1, 1, 1))
    tier = torch.where(forced, 0, torch.where(candidate, 1, 2)).to(torch.uint8)  # safeguarded first
    rank = _ranks(ranked.reshape(rows, heads * span), tier.reshape(rows, heads * span))
    keep.copy_(keep & ((rank.view(rows, heads, span) < pool.view(-1, 1, 1)) | ~in_range))


def _competing(
    positions: torch.Tensor, end: torch.Tensor, window: int, n_sink: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranked policies' one rule of what competes: (keys always kept, which count toward
    a head's budget: the sinks and the protected window [end - window, end); the positions that
    compete for the rest: [n_sink, end - window))."""
    boundary = (end - window).clamp(min=0)
    return n_sink + (end - boundary), (positions >= n_sink) & (positions < boundary)


def _ranks(ranked: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """Each entry's place along the last dim, ordered by ``tier`` (uint8, lower first), then by
    ``ranked`` descending, ties to the earlier index: a stable sort by score, then a stable sort
    by tier."""
    by_score = ranked.argsort(dim=-1, descending=True, stable=True)
    order = by_score.gather(-1, tier.gather(-1, by_score).argsort(dim=-1, stable=True))
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
