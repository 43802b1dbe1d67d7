"""The three built-in tasks: each one's fact, question and answer, and the filler around them.

- passkey: the classic repeated filler ("The grass is green. ...") hiding a 5-digit pass key
  (Mohtashami & Jaggi, 2023, "Landmark Attention").
- needle: a "special magic number" for a city hidden in real corpus text (the RULER needle).
- kv: many ``"<key>": "<value>",`` lines of random 8-hex-digit strings, one of which is asked
  for (multi-key key-value retrieval, Liu et al., 2023, "Lost in the Middle").

Every random choice comes from the probe's own ``random.Random``, never the global one, so a
probe is the same in every process. Answers of passkey and needle start with a space: they
follow "... is", and a space-led answer tokenizes as it would in running text.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from orchestrator.probes.filler import Unit
from orchestrator.probes.haystack import Encode, Haystack

MIN_FILLER_TOKENS = 16  # a probe with less filler than this tests nothing

PASSKEY_SENTENCES = (
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)
CITIES = (
    "Amsterdam", "Bangkok", "Berlin", "Bogota", "Cairo", "Chicago", "Dublin", "Helsinki", "Istanbul", "Jakarta",
    "Kyoto", "Lagos", "Lima", "Lisbon", "Madrid", "Montreal", "Nairobi", "Oslo", "Prague", "Santiago", "Seoul",
    "Sydney", "Toronto", "Vienna",
)  # fmt: skip
KV_BATCH = 64  # key-value lines tokenized per tokenizer call
SPREAD = 32  # parts drawn to find a task's longest fact, question and answer


@dataclass(frozen=True)
class Parts:
    """The texts of a probe besides its filler; ``reserved``: strings the filler must not contain."""

    fact: str
    question: str
    answer: str
    reserved: frozenset[str] = frozenset()


class Task(Protocol):
    """A built-in task: its parts and its filler, both drawn from the probe's ``rng``."""

    name: str
    always_snap: bool  # the fact must sit between whole units

    def parts(self, rng: random.Random) -> Parts: ...

    def spread(self) -> list[Parts]: ...

    def units(self, rng: random.Random, parts: Parts) -> Iterator[Unit]: ...

    def min_filler(self, fact_tokens: int) -> int: ...


class Passkey:
    name = "passkey"
    always_snap = False
    origin = "builtin:passkey"

    def __init__(self, encode: Encode) -> None:
        self._sentences = encode(list(PASSKEY_SENTENCES))

    def parts(self, rng: random.Random) -> Parts:
        key = str(rng.randint(10_000, 99_999))
        return Parts(
            fact=f" The pass key is {key}. Remember it. {key} is the pass key.",
            question="What is the pass key? The pass key is",
            answer=f" {key}",
        )

    def spread(self) -> list[Parts]:
        return _draws(self)

    def units(self, rng: random.Random, parts: Parts) -> Iterator[Unit]:
        return (Unit(ids, self.origin) for ids in itertools.cycle(self._sentences))

    def min_filler(self, fact_tokens: int) -> int:
        return MIN_FILLER_TOKENS


class Needle:
    name = "needle"
    always_snap = False

    def __init__(self, haystack: Haystack) -> None:
        self.haystack = haystack

    def parts(self, rng: random.Random) -> Parts:
        return self._parts(rng.choice(CITIES), rng)

    def spread(self) -> list[Parts]:
        rng = random.Random("needle-spread")
        return [self._parts(city, rng) for city in CITIES] + _draws(self)

    def _parts(self, city: str, rng: random.Random) -> Parts:
        number = str(rng.randint(1_000_000, 9_999_999))
        return Parts(
            fact=f" The special magic number for {city} is {number}.",
            question=f"What is the special magic number for {city}? The special magic number for {city} is",
            answer=f" {number}",
        )

    def units(self, rng: random.Random, parts: Parts) -> Iterator[Unit]:
        return self.haystack.units(*self.haystack.start(rng))

    def min_filler(self, fact_tokens: int) -> int:
        return MIN_FILLER_TOKENS


class KeyValue:
    name = "kv"
    always_snap = True  # a fact inside a line would break the list's structure
    origin = "builtin:kv"

    def __init__(self, encode: Encode) -> None:
        self._encode = encode

    def parts(self, rng: random.Random) -> Parts:
        key, value = _hex(rng), _hex(rng)
        while value == key:
            value = _hex(rng)
        return Parts(
            fact=_line(key, value),
            question=f'The value for key "{key}" is "',
            answer=value,
            reserved=frozenset({key, value}),
        )

    def spread(self) -> list[Parts]:
        return _draws(self)

    def units(self, rng: random.Random, parts: Parts) -> Iterator[Unit]:
        """Lines of fresh random keys and values, all distinct: the queried key appears once."""
        used = set(parts.reserved)
        while True:
            lines = []
            for _ in range(KV_BATCH):
                pair = []
                for _ in range(2):
                    text = _hex(rng)
                    while text in used:
                        text = _hex(rng)
                    used.add(text)
                    pair.append(text)
                lines.append(_line(*pair))
            yield from (Unit(ids, self.origin) for ids in self._encode(lines))

    def min_filler(self, fact_tokens: int) -> int:
        return max(MIN_FILLER_TOKENS, 2 * fact_tokens)  # at least two other lines to tell apart


def _draws(task: Task) -> list[Parts]:
    """Parts from fixed seeds: enough draws to meet the longest a tokenizer makes them."""
    return [task.parts(random.Random(f"{task.name}-spread-{i}")) for i in range(SPREAD)]


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(32):08x}"


def _line(key: str, value: str) -> str:
    return f'"{key}": "{value}",\n'
