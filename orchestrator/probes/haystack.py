"""The needle task's haystack: real corpus text as a stream of sentences.

A needle hidden in repeated filler tests little; hidden in the run's own corpus it competes
with real prose and code. The text is taken as it stands, consecutive from an offset the seed
chooses and wrapping through the documents in order (never twice over), so the same seed
always reads the same sentences. Sentences are the units: each starts with the whitespace that
precedes it, so a fact (which starts with a space) reads naturally at any sentence boundary.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

from orchestrator.corpus import Document
from orchestrator.probes.filler import Unit

# Boundaries: before the whitespace after a sentence's end, and before a paragraph break.
_BOUNDARY = re.compile(r"(?<=[.!?:])(?=\s)|(?<=\S)(?=\n\n)")
DOCUMENT_SEPARATOR = "\n\n"

Encode = Callable[[list[str]], list[list[int]]]


def sentences(text: str) -> list[str]:
    """The text cut at sentence ends and paragraph breaks; ``"".join`` gives the text back."""
    cuts = sorted({0, len(text), *(m.start() for m in _BOUNDARY.finditer(text))})
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


class Haystack:
    """The documents with text, their sentences tokenized once per build (in batches)."""

    def __init__(self, documents: list[Document], encode: Encode) -> None:
        self.documents = [d for d in documents if d.text.strip()]
        self._encode = encode
        self._sentences: dict[int, list[str]] = {}
        self._ids: dict[int, list[list[int]]] = {}

    def start(self, rng: random.Random) -> tuple[int, int]:
        """A (document, sentence) to start reading at, chosen by ``rng``."""
        doc = rng.randrange(len(self.documents))
        return doc, rng.randrange(len(self._texts(doc)))

    def units(self, doc: int, sentence: int) -> Iterator[Unit]:
        """Sentences from (doc, sentence) on, into the next documents and round to just
        before the start: every sentence of the haystack at most once."""
        order = [(doc, range(sentence, len(self._texts(doc))))]
        order += [((doc + k) % len(self.documents), None) for k in range(1, len(self.documents))]
        order += [(doc, range(sentence))]
        for index, sentence_range in order:
            ids = self._tokenized(index)
            origin = self.documents[index].source
            for i in sentence_range if sentence_range is not None else range(len(ids)):
                yield Unit(ids[i], origin)

    def tokens(self, enough: int | None = None) -> int:
        """The documents' tokens (separators included): what a needle probe can draw on, since
        it reads every sentence once. With ``enough``, counting stops once that many are found,
        so a large corpus is not tokenized whole to learn that it suffices."""
        total = 0
        for index in range(len(self.documents)):
            total += sum(map(len, self._tokenized(index)))
            if enough is not None and total >= enough:
                break
        return total

    def _texts(self, index: int) -> list[str]:
        """The document's sentences; the first carries the separator that precedes every
        document in the stream, so every unit starts with whitespace."""
        if index not in self._sentences:
            parts = sentences(self.documents[index].text)
            self._sentences[index] = [DOCUMENT_SEPARATOR + parts[0], *parts[1:]]
        return self._sentences[index]

    def _tokenized(self, index: int) -> list[list[int]]:
        if index not in self._ids:
            self._ids[index] = self._encode(self._texts(index))
        return self._ids[index]
