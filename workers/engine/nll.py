"""The per-token negative log-likelihood the chunk step reports (a probe's answer span, which it
sums apart, is :class:`workers.contract.plan.AnswerSpan`)."""

from __future__ import annotations

import torch


def token_nll(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token NLL [B, n] float64 from float32 logits [B, n, V].

    ``logsumexp - target logit`` over the vocabulary's contiguous last axis, subtracted in float64:
    within 1e-8 relative of a float64 log-softmax, with no float64 copy of the logits.
    (F.cross_entropy over the transposed [B, V, n] layout was 2e-4 nats/token off on CPU.)
    ``lse``: the logits' logsumexp [B, n] when the caller already has it (the agreement columns
    need it too).
    """
    target = logits.gather(-1, targets[..., None])[..., 0]
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    return lse.double() - target.double()
