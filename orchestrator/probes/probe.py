"""One probe document: token ids whose last tokens are the answer, plus what describes it.

The engine teacher-forces the answer span, so the one fact it must be able to trust is where
that span starts; the dataclass refuses to exist when the span does not end the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """A retrieval probe: ``token_ids[answer_start:]`` are the answer's own ids."""

    doc_id: str  # unique and deterministic: "needle-1024-d0.25-s0" (task, length, depth, sample)
    token_ids: list[int]  # [BOS if the tokenization has one] + context + question + answer
    answer_start: int  # index of the first answer token
    answer_tokens: int  # len(answer ids) >= 1; answer_start + answer_tokens == len(token_ids)
    task: str  # "passkey" | "needle" | "kv" | "custom" (bring-your-own JSONL)
    context_length: int  # the requested length (== len(token_ids) for built-ins); BYO: len(token_ids)
    depth: float | None  # requested insertion depth in [0, 1]; BYO: the record's "depth" or None
    answer: str  # the answer text
    source: str  # where the haystack or records came from (corpus source or the JSONL path)

    def __post_init__(self) -> None:
        if self.answer_tokens < 1 or self.answer_start + self.answer_tokens != len(self.token_ids):
            raise ValueError(
                f"probe {self.doc_id}: the answer span [{self.answer_start}, +{self.answer_tokens}) "
                f"must be the last tokens of {len(self.token_ids)}"
            )


def assemble(
    doc_id: str,
    *,
    prefix: list[int],
    context: list[int],
    question: list[int],
    answer: list[int],
    task: str,
    context_length: int | None,
    depth: float | None,
    answer_text: str,
    source: str,
) -> Probe:
    """The probe of separately tokenized parts, concatenated as ids (never re-tokenized, so the
    answer's ids are exactly its own tokenization and ``answer_start`` is exact)."""
    token_ids = [*prefix, *context, *question, *answer]
    return Probe(
        doc_id=doc_id,
        token_ids=token_ids,
        answer_start=len(token_ids) - len(answer),
        answer_tokens=len(answer),
        task=task,
        context_length=len(token_ids) if context_length is None else context_length,
        depth=depth,
        answer=answer_text,
        source=source,
    )
