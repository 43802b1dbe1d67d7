"""The eager engine's two keep rules, as functions of the tensors they read and write.

They decide which of a row group's keys stay in the cache once scored (docs/DESIGN.md, "The
evaluation protocol"). The compiled chunk step (workers/chunk_step.py) states the same rules as
masks over its static shapes; tests/test_chunk_step.py holds the two to the same kept keys.
"""

from __future__ import annotations

import torch


def decide_by_threshold(
    keep: torch.Tensor,
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    n_sink: int,
    decided: int,
    newly_decided: int,
    leaving: torch.Tensor | None = None,
) -> None:
    """Keys that just left the protected window are kept for good iff score >= threshold.

    ``keep`` and ``scores`` are a row group's [rows, kv-heads, positions] tensors (``keep`` is
    written in place), ``thresholds`` [rows, 1, 1]. Keys in [decided, newly_decided) are decided
    now; the first ``n_sink`` positions are always kept. With per-head windows that range spans
    every head's and ``leaving`` [kv-heads, newly_decided - decided] marks each head's own part.
    """
    if newly_decided <= decided:
        return
    decision = scores[:, :, decided:newly_decided] >= thresholds
    n_protected_sinks = min(n_sink, newly_decided) - decided
    if n_protected_sinks > 0:
        decision[:, :, :n_protected_sinks] = True
    if leaving is not None:
        decision = torch.where(leaving, decision, keep[:, :, decided:newly_decided])
    keep[:, :, decided:newly_decided] = decision


def keep_limit(keep_fraction: torch.Tensor, budgets: torch.Tensor, end: int | torch.Tensor) -> torch.Tensor:
    """Keys each row may hold per (layer, kv-head) once [0, end) is seen: ceil((1 - r) * end)
    under the ratio policy, the token budget B under the budget policy. [rows] int64.

    Each row carries both (``keep_fraction`` 1 under budget, ``budgets`` unbounded under ratio),
    so one formula serves a group of either policy with no branch on the host.
    """
    return torch.minimum(torch.ceil(keep_fraction * end).long(), budgets)


def decide_by_budget(
    keep: torch.Tensor, scores: torch.Tensor, limit: torch.Tensor, n_sink: int, end: int, boundary: int
) -> None:
    """Keep the best-scoring keys so kept <= ``limit`` [rows] per (layer, kv-head)
    (:func:`keep_limit`: the ratio or token-budget policy).

    Sinks and the protected window ([boundary, end)) are always kept and count toward the
    budget; the rest of it goes to the highest scores among keys still kept, since evictions are
    final. Ties go to the earlier position (a stable sort).
    """
    if boundary <= n_sink:
        return
    protected = n_sink + (end - boundary)
    allowed = (limit - protected).clamp(min=0)  # [rows]
    candidates = keep[:, :, n_sink:boundary]
    ranked = scores[:, :, n_sink:boundary].masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    candidates &= rank < allowed.view(-1, 1, 1)
