"""Stop strings: where a greedy answer ends when a text, not a token, ends it.

A stop string ("\\n" after a one-line answer, a task's closing tag) is text, and one token may
hold it with other characters (".\\n"), so the engine cannot watch for it by token id. Greedy
decoding is deterministic, so an answer generated on past its stop string has, up to it, exactly
the tokens a run that stopped there would have: the answer is cut after the fact, at the first
token whose text completes a stop string (workers/engine/core.py's ``Generated.cut`` keeps the
density of those tokens alone). A stop string that is one whole token also stops the rows early
(:func:`single_token_stops`), which saves the steps and changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` starts, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(token_ids: list[int], decode: Decode, stops: Sequence[str]) -> tuple[int, str] | None:
    """(tokens up to and including the one that completes the first stop string, the answer's
    text before that stop string), or None when no stop string appears.

    The shortest prefix whose text holds a stop string, by bisection: a prefix's text only grows
    as tokens are added, so "holds a stop string" turns true once and stays true.
    """
    if not stops or first_stop(decode(token_ids), stops) is None:
        return None
    low, high = 1, len(token_ids)  # the answer is high tokens long at most
    while low < high:
        middle = (low + high) // 2
        if first_stop(decode(token_ids[:middle]), stops) is None:
            low = middle + 1
        else:
            high = middle
    text = decode(token_ids[:low])
    return low, text[: first_stop(text, stops)]


def single_token_stops(stops: Sequence[str], encode: Callable[[str], list[int]], decode: Decode) -> list[int]:
    """Token ids that are, on their own, exactly one of ``stops``: rows that emit one may stop
    at once (the cut after the fact would end them there anyway)."""
    ids = []
    for text in stops:
        encoded = encode(text)
        if len(encoded) == 1 and decode(encoded) == text:
            ids.append(encoded[0])
    return ids
