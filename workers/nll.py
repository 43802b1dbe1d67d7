"""The per-token negative log-likelihood both engines report, and a probe's answer span."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class AnswerSpan:
    """A retrieval probe's answer: the document's tokens [start, start + tokens), teacher-forced.

    The engines score it like every other target and also sum, per chunk, the NLL and top-1 hits
    of the answer tokens alone; the answer is exactly matched when all of them are hits, which
    is what greedy decoding would produce.
    """

    start: int
    tokens: int

    def __post_init__(self) -> None:
        if self.start < 1 or self.tokens < 1:
            raise ValueError(f"an answer span needs start >= 1 and tokens >= 1, got {self.start}, {self.tokens}")

    @property
    def predicted_from(self) -> int:
        """The first position whose prediction is an answer token (the one before it)."""
        return self.start - 1

    def targets_in(self, start: int, n_targets: int) -> int:
        """Answer tokens among the targets of the predictions at [start, start + n_targets)."""
        lo, hi = max(start, self.predicted_from), min(start + n_targets, self.predicted_from + self.tokens)
        return max(0, hi - lo)
