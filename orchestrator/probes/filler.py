"""Filler cut to an exact token count, and where a depth puts the fact in it.

A built-in probe must be exactly its requested length, so its filler is a stream of units
(sentences, key-value lines), each tokenized on its own, cut to exactly the tokens left over.
Whole units rarely add up to that count: one unit is cut at a token, and the cut goes at the
end of the filler away from the fact (the end when the fact sits in the first half, the start
otherwise), so the fact's neighbours are whole units and depths 0 and 1 stay exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# The fact moves to a unit boundary at most this many tokens (and this fraction of the filler)
# away from the exact depth, so the text around it reads naturally yet the depth stays within
# 0.03 of the request. Corpus sentences average ~22 tokens: 16 finds a boundary ~85% of the time.
SNAP_TOKENS = 16
SNAP_FRACTION = 0.03


@dataclass(frozen=True)
class Unit:
    """A piece of filler: its ids and where its text came from (a corpus document's source)."""

    ids: list[int]
    origin: str


@dataclass(frozen=True)
class Filler:
    """Exactly the filler's ids, the positions where a whole unit starts, and their origins."""

    ids: list[int]
    starts: tuple[int, ...]  # sorted; 0 and len(ids) always included
    origins: tuple[str, ...]  # the origins of the units that kept a token, first seen first


def cut(units: Iterable[Unit], tokens: int, keep_tail: bool) -> Filler | None:
    """The first units whose ids reach ``tokens``, cut to exactly ``tokens``: the last unit
    shortened (``keep_tail`` False) or the first (True). None when the units run out first."""
    taken: list[Unit] = []
    total = 0
    for unit in units:
        if not unit.ids:
            continue
        taken.append(unit)
        total += len(unit.ids)
        if total >= tokens:
            break
    if total < tokens:
        return None
    drop = total - tokens if keep_tail else 0
    ids: list[int] = []
    starts: list[int] = []
    origins: dict[str, None] = {}
    position = -drop
    for unit in taken:
        if position >= 0:
            starts.append(position)
        end = position + len(unit.ids)
        if end > 0 and position < tokens:
            origins[unit.origin] = None
        position = end
        ids.extend(unit.ids)
    ids = ids[drop : drop + tokens]
    return Filler(ids, tuple(sorted({0, tokens, *(s for s in starts if s <= tokens)})), tuple(origins))


def insertion_point(filler: Filler, depth: float, always_snap: bool) -> int:
    """Where the fact goes: the fraction ``depth`` of the filler before it, moved to the nearest
    unit start when one is close (any distance when ``always_snap``: key-value lines must stay
    whole)."""
    size = len(filler.ids)
    target = round(depth * size)
    nearest = min(filler.starts, key=lambda start: (abs(start - target), start))
    if always_snap or abs(nearest - target) <= snap_tokens(size):
        return nearest
    return target


def snap_tokens(filler_tokens: int) -> int:
    """How far the fact may move to reach a unit boundary: a few tokens, less in short filler."""
    return min(SNAP_TOKENS, int(SNAP_FRACTION * filler_tokens))
