"""What each chunk's predictions score, per batch row: the sums a lake row records.

Both engines score a chunk's predictions through :func:`prediction_sums` and keep the results
in a :class:`ChunkResults` of [chunks, B] device tensors, read back once per document, so the
two engines cannot drift apart in what a column means.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from workers.engine.agreement import agreement_sums
from workers.engine.nll import token_nll

# Field -> dtype; agreement and answer fields exist only when the run records them.
_DTYPES = {
    "nll": torch.float64,
    "correct": torch.int64,
    "kept": torch.int64,
    "kl": torch.float64,
    "top1": torch.int64,
    "top5": torch.float64,
    "answer_nll": torch.float64,
    "answer_correct": torch.int64,
}
AGREEMENT_FIELDS = ("kl", "top1", "top5")
ANSWER_FIELDS = ("answer_nll", "answer_correct")


@dataclass
class ChunkResults:
    """[chunks, B] per field: NLL sum, top-1 hits and kept keys of every chunk and config; the
    agreement sums (None when off) and the answer span's NLL and hits (None without one)."""

    nll: torch.Tensor
    correct: torch.Tensor
    kept: torch.Tensor
    kl: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    top5: torch.Tensor | None = None
    answer_nll: torch.Tensor | None = None
    answer_correct: torch.Tensor | None = None

    @classmethod
    def zeros(cls, n_chunks: int, batch: int, device: torch.device, agreement: bool, answer: bool) -> ChunkResults:
        names = ["nll", "correct", "kept"]
        names += list(AGREEMENT_FIELDS) if agreement else []
        names += list(ANSWER_FIELDS) if answer else []
        return cls(**{name: torch.zeros(n_chunks, batch, dtype=_DTYPES[name], device=device) for name in names})

    def fields(self) -> dict[str, torch.Tensor]:
        """The recorded fields by name (those not None)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def head(self, n_chunks: int, answer: bool = True) -> ChunkResults:
        """The first ``n_chunks`` chunks on the CPU (one copy per field: the document's readback);
        without ``answer`` the answer fields are dropped (a document that is no probe)."""
        kept = {k: v[:n_chunks].cpu() for k, v in self.fields().items() if answer or k not in ANSWER_FIELDS}
        return ChunkResults(**kept)


def prediction_sums(
    pred: torch.Tensor,
    targets: torch.Tensor,
    counted: torch.Tensor | None,
    reference: int | None,
    in_answer: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Per row [R], the sums of one chunk's predictions ``pred`` [R, n, V] (float32 logits) of
    ``targets`` [R, n], over the positions ``counted`` [n] (None: all): NLL and top-1 hits; with a
    ``reference`` row the agreement sums; with ``in_answer`` [n] the answer tokens' NLL and hits."""
    lse = torch.logsumexp(pred, dim=-1)
    nll = token_nll(pred, targets, lse)
    hit = pred.argmax(dim=-1) == targets
    if counted is not None:
        nll, hit = torch.where(counted, nll, 0.0), hit & counted
    sums = {"nll": nll.sum(dim=1), "correct": hit.sum(dim=1)}
    if reference is not None:
        sums["kl"], sums["top1"], sums["top5"] = agreement_sums(pred, lse, reference, counted)
    if in_answer is not None:
        sums["answer_nll"] = torch.where(in_answer, nll, 0.0).sum(dim=1)
        sums["answer_correct"] = (hit & in_answer).sum(dim=1)
    return sums
