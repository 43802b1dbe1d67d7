"""Stop strings (workers/contract/stopping.py): an answer ends at the first token whose text
completes a stop string, even when that token holds more than the stop string."""

from __future__ import annotations

import pytest

from workers.contract.stopping import cut_at_stop, single_token_stops

PIECES = ["The", " answer", " is", " 42", ".\n", "Next", " line", "\n"]


def piece_decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (["\n"], (5, "The answer is 42.")),  # inside the token ".\n"
        ([" is 4"], (4, "The answer")),  # across three tokens, completed by the fourth
        (["line", "\n"], (5, "The answer is 42.")),  # the earliest of several
        (["Next line"], (7, "The answer is 42.\n")),
        (["nowhere"], None),
        ([], None),
    ],
)
def test_the_cut_is_the_shortest_prefix_holding_a_stop_and_the_text_before_it(stops, expected):
    assert cut_at_stop(list(range(len(PIECES))), piece_decode, stops) == expected


def test_the_cut_equals_a_naive_token_by_token_scan():
    """The bisection against the obvious loop, over every stop string that is a substring."""
    ids = list(range(len(PIECES)))
    text = piece_decode(ids)
    for start in range(len(text)):
        for end in range(start + 1, min(len(text), start + 6) + 1):
            stop = text[start:end]
            n = next(k for k in range(1, len(ids) + 1) if stop in piece_decode(ids[:k]))
            prefix = piece_decode(ids[:n])
            assert cut_at_stop(ids, piece_decode, [stop]) == (n, prefix[: prefix.find(stop)]), stop


def test_a_stop_string_that_is_one_token_stops_rows_early(smollm2_tokenizer):
    tok = smollm2_tokenizer

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    newline = encode("\n")
    assert len(newline) == 1
    assert single_token_stops(["\n", "Paris is", "\n\n\n\n\n\n\n\nqq"], encode, decode) == newline
    ids = encode("Paris.\nRome")
    assert cut_at_stop(ids, decode, ["\n"]) == (len(encode("Paris.\n")), "Paris.")
