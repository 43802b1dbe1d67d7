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
) -> None:
    """Keep the best-scoring keys so kept <= ``limit`` [rows] per (layer, kv-head)
    (:func:`keep_limit`: the ratio or token-budget policy).

    Sinks and the protected window ([end - window, end)) are always kept and count toward the
    budget; the rest of it goes to the highest scores among keys still kept in [n_sink, end -
    window), since evictions are final. Ties go to the earlier position: ranks come from a stable
    sort by score, then a stable sort that moves positions outside the range last.
    """
    boundary = (end - window).clamp(min=0)
    protected = n_sink + (end - boundary)
    allowed = (limit - protected).clamp(min=0)  # [rows]
    in_range = (positions >= n_sink) & (positions < boundary)
    ranked = torch.where(in_range & keep, scores, float("-inf"))
    by_score = ranked.argsort(dim=-1, descending=True, stable=True)
    outside_last = (~in_range)[by_score].to(torch.uint8).argsort(dim=-1, stable=True)
    order = by_score.gather(-1, outside_last)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    keep.copy_(keep & ((rank < allowed.view(-1, 1, 1)) | ~in_range))
