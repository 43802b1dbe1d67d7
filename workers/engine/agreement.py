"""Agreement with the uncompressed model: how far a config's next-token distributions moved.

ΔNLL only asks how likely the true next token stayed; these ask whether the compressed model
still predicts what the uncompressed one does, the question a deployment cares about. Both
engines run the baseline as one row of the batch, so its logits are already in the forward:
the measures cost a few reductions over the logits, no extra forward.
"""

from __future__ import annotations

import torch

TOP_K = 5


def agreement_sums(
    pred: torch.Tensor, lse: torch.Tensor, reference: int, counted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row [R], summed over the positions ``counted`` [n] (all when None):
    KL(reference || row) in nats (float64), positions whose argmax is the reference's (int64),
    and |top-5 ∩ reference top-5| / 5 (float64).

    ``pred`` [R, n, V] float32 logits and ``lse`` [R, n] their logsumexp; ``reference`` is the
    baseline's row. KL is summed as p_ref · (logit_ref - logit_row) - (lse_ref - lse_row): each
    term is a difference of two nearly equal numbers rather than of two large ones, so a
    config that equals the baseline gives exactly 0, and a small divergence is not lost in the
    rounding of its two log-probabilities.
    """
    ref, ref_lse = pred[reference], lse[reference]
    p_ref = torch.exp(ref - ref_lse[:, None])  # [n, V]
    kl = (p_ref * (ref - pred)).sum(dim=-1).double() - (ref_lse - lse).double()  # [R, n]
    top = pred.topk(TOP_K, dim=-1).indices  # [R, n, k], best first
    top1 = top[..., 0] == top[reference, :, 0]
    overlap = (top[..., :, None] == top[reference][None, :, None, :]).any(dim=-1).sum(dim=-1).double() / TOP_K
    kl = kl.clamp(min=0.0)  # a KL is >= 0; float rounding of a near-zero one is not a gain
    if counted is not None:
        kl, top1, overlap = kl * counted, top1 & counted, overlap * counted
    return kl.sum(dim=1), top1.sum(dim=1), overlap.sum(dim=1)
