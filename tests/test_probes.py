"""Retrieval probes (orchestrator/probes/): exact lengths, exact answer spans, depth placement,
determinism, the needle's haystack, the kv list, bring-your-own JSONL and every user error.

Positions are measured independently of the builder: the test tokenizes the fact, question and
answer texts itself, finds them in the ids, and decodes the ids back to text."""

from __future__ import annotations

import json
import math
import re

import pytest

from orchestrator.corpus import Document, load_corpus
from orchestrator.errors import KvorchError
from orchestrator.probes import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    TASKS,
    ProbeSpec,
    build_probes,
    check_task,
    parse_depths,
    parse_lengths,
)
from orchestrator.probes.filler import Unit, cut
from orchestrator.probes.spec import check_lengths, length_label
from workers.contract.tokenization import resolve

ANSWER_PATTERN = {"passkey": r" \d{5}", "needle": r" \d{7}", "kv": r"[0-9a-f]{8}"}
QUESTION = {
    "passkey": lambda text: "What is the pass key? The pass key is",
    "needle": lambda text: re.findall(r"What is the special magic number for [^?]+\? The special magic "
                                              r"number for [^\n]+ is$", text)[-1],
    "kv": lambda text: re.findall(r'The value for key "[0-9a-f]{8}" is "$', text)[-1],
}  # fmt: skip


@pytest.fixture(scope="session")
def tokenization(smollm2_tokenizer):
    return resolve(smollm2_tokenizer, "auto")


@pytest.fixture(scope="session")
def pydoc():
    return load_corpus("pydoc")


@pytest.fixture(scope="session")
def default_probes(tokenization, pydoc):
    return {task: build_probes(ProbeSpec(task), tokenization, pydoc, 8192) for task in TASKS}


def encode(tokenization, text: str) -> list[int]:
    return tokenization.tokenizer(text, add_special_tokens=False)["input_ids"]


def find(ids: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub]


def fact_text(task: str, probe, question: str) -> str:
    """The fact as the task defines it, rebuilt from the probe's answer and question."""
    if task == "passkey":
        key = probe.answer.strip()
        return f" The pass key is {key}. Remember it. {key} is the pass key."
    if task == "needle":
        city = re.match(r"What is the special magic number for (.+)\?", question).group(1)
        return f" The special magic number for {city} is{probe.answer}."
    key = re.match(r'The value for key "([0-9a-f]{8})"', question).group(1)
    return f'"{key}": "{probe.answer}",\n'


def layout(tokenization, task: str, probe) -> tuple[int, int, int]:
    """(fact start, fact end, question start) in the probe's ids, found by the test's own tokenization."""
    tok = tokenization.tokenizer
    text = tok.decode(probe.token_ids[: probe.answer_start])
    question = QUESTION[task](text)
    question_ids = encode(tokenization, question)
    question_start = probe.answer_start - len(question_ids)
    assert probe.token_ids[question_start : probe.answer_start] == question_ids
    fact_ids = encode(tokenization, fact_text(task, probe, question))
    (fact_start,) = find(probe.token_ids[:question_start], fact_ids)
    return fact_start, fact_start + len(fact_ids), question_start


@pytest.mark.parametrize("task", TASKS)
def test_built_in_probes_are_exactly_their_length_and_end_with_their_answer(task, default_probes, tokenization):
    probes = default_probes[task]
    assert len(probes) == len(DEFAULT_LENGTHS) * len(DEFAULT_DEPTHS)
    assert sorted({p.context_length for p in probes}) == sorted(DEFAULT_LENGTHS)
    for probe in probes:
        assert len(probe.token_ids) == probe.context_length
        assert probe.token_ids[0] == tokenization.bos_id == 1
        assert tokenization.bos_id not in probe.token_ids[1:]
        assert re.fullmatch(ANSWER_PATTERN[task], probe.answer)
        answer_ids = encode(tokenization, probe.answer)
        assert probe.answer_tokens == len(answer_ids) >= 1
        assert probe.answer_start + probe.answer_tokens == len(probe.token_ids)
        assert probe.token_ids[probe.answer_start :] == answer_ids
        assert tokenization.tokenizer.decode(probe.token_ids[probe.answer_start :]) == probe.answer
        assert probe.task == task and probe.depth in DEFAULT_DEPTHS
        layout(tokenization, task, probe)  # the question sits right before the answer, the fact once


@pytest.mark.parametrize("task", TASKS)
def test_depth_is_the_fraction_of_filler_before_the_fact(task, tokenization, pydoc):
    depths = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
    probes = build_probes(ProbeSpec(task, lengths=(512, 1024, 3000), depths=depths), tokenization, pydoc, None)
    for probe in probes:
        fact_start, fact_end, question_start = layout(tokenization, task, probe)
        filler = (fact_start - 1) + (question_start - fact_end)  # BOS, fact and question excluded
        assert abs((fact_start - 1) / filler - probe.depth) <= 0.05, probe.doc_id
        if probe.depth == 0:
            assert fact_start == 1  # right after BOS
        if probe.depth == 1:  # right before the question (and its newline)
            assert tokenization.tokenizer.decode(probe.token_ids[fact_end:question_start]) == "\n"


def test_short_kv_probes_keep_the_fact_on_a_line_boundary(tokenization, pydoc):
    """kv snaps to whole lines at any distance: at 256 tokens a line is ~1/10 of the filler."""
    probes = build_probes(ProbeSpec("kv", lengths=(256,), depths=(0.0, 0.3, 0.5, 0.7, 1.0)), tokenization, pydoc, None)
    for probe in probes:
        fact_start, fact_end, question_start = layout(tokenization, "kv", probe)
        text = tokenization.tokenizer.decode(probe.token_ids)
        assert re.search(r'(^<\|im_start\|>|\n)"[0-9a-f]{8}": "' + probe.answer + '",\n', text)
        line = fact_end - fact_start
        filler = (fact_start - 1) + (question_start - fact_end)
        assert abs((fact_start - 1) / filler - probe.depth) <= line / 2 / filler + 1e-9


def test_builds_are_deterministic_and_seeds_and_samples_differ(tokenization, pydoc, default_probes):
    for task in TASKS:
        again = build_probes(ProbeSpec(task), resolve(tokenization.tokenizer, "auto"), list(pydoc), 8192)
        assert again == default_probes[task]
        seeded = build_probes(ProbeSpec(task, seed=1), tokenization, pydoc, 8192)
        assert all(a.token_ids != b.token_ids for a, b in zip(seeded, default_probes[task], strict=True))
        sampled = build_probes(ProbeSpec(task, lengths=(512,), depths=(0.5,), samples=3), tokenization, pydoc, None)
        assert [p.doc_id for p in sampled] == [f"{task}-512-d0.5-s{i}" for i in range(3)]
        assert len({tuple(p.token_ids) for p in sampled}) == 3
        assert len({p.answer for p in sampled}) == 3
    ids = [p.doc_id for probes in default_probes.values() for p in probes]
    assert len(ids) == len(set(ids)) == 45
    assert "needle-1024-d0.25-s0" in ids and "passkey-256-d0-s0" in ids and "kv-512-d1-s0" in ids


def test_adding_a_length_or_depth_leaves_the_other_probes_alone(tokenization, pydoc):
    small = build_probes(ProbeSpec("needle", lengths=(512,), depths=(0.5,)), tokenization, pydoc, None)
    more = build_probes(ProbeSpec("needle", lengths=(256, 512), depths=(0.0, 0.5)), tokenization, pydoc, None)
    assert small == [p for p in more if p.doc_id == "needle-512-d0.5-s0"]


def test_needle_hides_its_fact_in_the_haystack_text(tokenization, pydoc):
    stream = "\n\n".join(d.text for d in pydoc)
    stream = stream + "\n\n" + stream  # the reading wraps from the last document to the first
    probes = build_probes(ProbeSpec("needle", lengths=(1024, 4096), samples=2), tokenization, pydoc, None)
    starts = set()
    for probe in probes:
        fact_start, fact_end, question_start = layout(tokenization, "needle", probe)
        decode = tokenization.tokenizer.decode
        before, after = decode(probe.token_ids[1:fact_start]), decode(probe.token_ids[fact_end : question_start - 1])
        for piece in (before, after):  # the cut sentence may end in half a character
            assert piece.strip("\ufffd") in stream, probe.doc_id
        assert len(before) + len(after) > 3 * probe.context_length  # prose, not a few repeated tokens
        assert probe.source == "pydoc_data.topics"
        starts.add((before + after)[:40])
    assert len(starts) == len(probes)  # each probe reads from its own offset


def test_needle_reads_the_documents_it_is_given_and_says_when_they_are_too_few(tokenization):
    docs = [
        Document("a", " ".join(f"Alpha fact {i} is here." for i in range(60)), "a.txt"),
        Document("b", " ".join(f"Beta fact {i} is here." for i in range(60)), "b.txt"),
    ]
    (probe,) = build_probes(ProbeSpec("needle", lengths=(900,), depths=(0.5,)), tokenization, docs, None)
    fact_start, fact_end, _ = layout(tokenization, "needle", probe)
    text = tokenization.tokenizer.decode(probe.token_ids[1:fact_start] + probe.token_ids[fact_end:])
    assert "Alpha fact" in text and "Beta fact" in text  # 900 tokens need both documents
    assert probe.source in ("a.txt;b.txt", "b.txt;a.txt")
    with pytest.raises(KvorchError, match=r"--lengths 2k: a needle probe needs \d+ tokens of corpus text but the "
                                          r"corpus has \d+; use a larger --corpus or lengths <= \d+"):  # fmt: skip
        build_probes(ProbeSpec("needle", lengths=(2048,)), tokenization, docs, None)
    with pytest.raises(KvorchError, match="corpus, which has no text"):
        build_probes(ProbeSpec("needle"), tokenization, [Document("e", "  \n", "e.txt")], None)


def test_kv_queries_a_key_that_appears_once_among_distinct_keys(default_probes, tokenization):
    for probe in default_probes["kv"]:
        context = tokenization.tokenizer.decode(probe.token_ids[1 : probe.answer_start])
        key = re.search(r'The value for key "([0-9a-f]{8})" is "$', context).group(1)
        body = context[: context.rindex("\nThe value for key")]
        assert body.count(key) == 1 and body.count(probe.answer) == 1
        assert f'"{key}": "{probe.answer}",\n' in body
        pairs = re.findall(r'^"([0-9a-f]{8})": "([0-9a-f]{8})",$', body, flags=re.M)
        assert len(pairs) >= probe.context_length // 25  # the list fills the context
        strings = [s for pair in pairs for s in pair]
        assert len(strings) == len(set(strings))


def test_without_bos_the_probe_is_still_exact(smollm2_tokenizer, pydoc):
    off = resolve(smollm2_tokenizer, "off")
    for task in TASKS:
        (probe,) = build_probes(ProbeSpec(task, lengths=(300,), depths=(0.0,)), off, pydoc, None)
        assert len(probe.token_ids) == 300
        assert layout(off, task, probe)[0] == 0  # depth 0 is position 0 when nothing is prepended


def test_cut_takes_exactly_the_tokens_and_marks_whole_units():
    units = [Unit([1, 2, 3], "a"), Unit([4, 5], "a"), Unit([6, 7, 8, 9], "b"), Unit([10], "c")]
    head = cut(iter(units), 7, keep_tail=False)
    assert head.ids == [1, 2, 3, 4, 5, 6, 7] and head.starts == (0, 3, 5, 7) and head.origins == ("a", "b")
    tail = cut(iter(units), 7, keep_tail=True)
    assert tail.ids == [3, 4, 5, 6, 7, 8, 9] and tail.starts == (0, 1, 3, 7) and tail.origins == ("a", "b")
    assert cut(iter(units), 10, keep_tail=True).ids == list(range(1, 11))
    assert cut(iter(units), 11, keep_tail=False) is None


def test_parse_lengths_and_depths():
    assert parse_lengths("1k,4k,16k") == (1024, 4096, 16384)
    assert parse_lengths(" 512, 1.5k ") == (512, 1536)
    assert parse_depths("0,0.25,1") == (0.0, 0.25, 1.0)
    assert math.copysign(1, parse_depths("-0")[0]) == 1  # one label for 0


@pytest.mark.parametrize(
    "text,message",
    [
        ("1x", "--lengths '1x' is not a length; use token counts like 512,1k,16k (k = 1024)"),
        ("512,abc", "--lengths 'abc' is not a length; "),
        ("-5", "--lengths '-5' is not a length; "),
        ("0", "--lengths 0: lengths must be positive; "),
        ("1.3k", "--lengths 1.3k is not a whole number of tokens (1331.2); "),
        ("", "--lengths is empty; "),
        ("1k,1024", "--lengths lists 1k twice; list each value once"),
    ],
)
def test_bad_lengths_say_what_to_write(text, message):
    with pytest.raises(KvorchError, match=re.escape(message)):
        parse_lengths(text)


def test_a_length_is_shown_as_the_number_given():
    """Issue 28: --lengths 1000000000 was echoed as 976562k (976562.5k, cut to 6 digits)."""
    with pytest.raises(KvorchError) as error:
        check_lengths(parse_lengths("1000000000"), 8192)
    assert str(error.value) == (
        "--lengths 1000000000: 1000000000 tokens exceed the model's context of 8192; use lengths <= 8192"
    )
    shown = [length_label(n) for n in parse_lengths("16k,1.5k,1000k,1000,2048")]
    assert shown == ["16k", "1.5k", "1000k", "1000", "2k"]
    assert parse_lengths("1000000000,999999488") == (1000000000, 999999488)  # two lengths, not "976562k" twice


@pytest.mark.parametrize(
    "text,shown", [("0,1.5", "1.5"), ("nan", "nan"), ("-0.1", "-0.1"), ("half", "'half'"), ("inf", "inf")]
)
def test_bad_depths_say_the_range(text, shown):
    with pytest.raises(KvorchError, match=re.escape(f"--depths must lie in [0, 1], got {shown}; use fractions like")):
        parse_depths(text)


def test_check_task(tmp_path):
    for task in TASKS:
        check_task(task)
    with pytest.raises(KvorchError) as error:
        check_task("nedle")
    assert str(error.value) == (
        "--task 'nedle' is unknown; use one of passkey, needle, kv, ruler[:NAME], or a .jsonl file with context, "
        "question and answer (a probe) or answers (a question)"
    )
    with pytest.raises(KvorchError, match=r"--task .*missing\.jsonl: no such file; use one of passkey"):
        check_task(str(tmp_path / "missing.jsonl"))
    not_jsonl = tmp_path / "probes.json"
    not_jsonl.write_text("{}")
    with pytest.raises(KvorchError, match="is unknown"):
        check_task(str(not_jsonl))
    (tmp_path / "p.jsonl").write_text("")
    check_task(str(tmp_path / "p.jsonl"))


def test_bad_specs_fail_before_any_probe_is_built(tokenization, pydoc):
    def build(task="passkey", max_context=None, **fields):
        return build_probes(ProbeSpec(task, **fields), tokenization, pydoc, max_context)

    with pytest.raises(KvorchError) as error:
        build(lengths=(1024, 16384), max_context=8192)
    assert str(error.value) == "--lengths 16k: 16384 tokens exceed the model's context of 8192; use lengths <= 8192"
    with pytest.raises(KvorchError, match="'nedle' is unknown"):
        build("nedle")
    with pytest.raises(KvorchError, match=r"--samples 0: use 1 or more"):
        build(samples=0)
    with pytest.raises(KvorchError, match=re.escape("--depths must lie in [0, 1], got 1.5")):
        build(depths=(0.5, 1.5))
    with pytest.raises(KvorchError, match=re.escape("--depths must lie in [0, 1], got nan")):
        build(depths=(float("nan"),))
    with pytest.raises(KvorchError, match="--lengths 0: lengths must be positive"):
        build(lengths=(0,))


@pytest.mark.parametrize("task", TASKS)
def test_too_short_lengths_name_the_minimum_and_it_is_right(task, tokenization, pydoc):
    with pytest.raises(KvorchError) as error:
        build_probes(ProbeSpec(task, lengths=(512, 20)), tokenization, pydoc, None)
    message = str(error.value)
    minimum = int(re.fullmatch(
        rf"--lengths 20: too short for a {task} probe, which needs at least (\d+) tokens \(its fact, question "
        r"and answer plus some filler\); use lengths >= (\d+)", message).group(1))  # fmt: skip
    probes = build_probes(ProbeSpec(task, lengths=(minimum,)), tokenization, pydoc, None)
    assert all(len(p.token_ids) == minimum for p in probes)
    for probe in probes:
        fact_start, fact_end, question_start = layout(tokenization, task, probe)
        assert (fact_start - 1) + (question_start - fact_end) >= 16  # some filler
    with pytest.raises(KvorchError, match=f"--lengths {minimum - 1}: too short"):
        build_probes(ProbeSpec(task, lengths=(minimum - 1,)), tokenization, pydoc, None)


def write_jsonl(path, *records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_bring_your_own_probes_round_trip(tmp_path, tokenization, pydoc):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        {"id": "capital", "context": "Paris is the capital of France.", "question": "The capital of France is",
         "answer": " Paris", "depth": 0.5},
        "",
        {"context": "A: 1\nB: 2\n", "question": "B:", "answer": " 2", "extra": [1]},
    )  # fmt: skip
    # lengths, depths and samples do not apply to a file of probes
    first, second = build_probes(ProbeSpec(path, lengths=(8,), samples=3), tokenization, pydoc, 64)
    ids = lambda text: encode(tokenization, text)  # noqa: E731
    assert first.token_ids == [1, *ids("Paris is the capital of France."), *ids("\nThe capital of France is"),
                               *ids(" Paris")]  # fmt: skip
    assert second.token_ids == [1, *ids("A: 1\nB: 2\n"), *ids("B:"), *ids(" 2")]  # no second newline
    assert (first.doc_id, first.depth, second.doc_id, second.depth) == ("capital", 0.5, "mine-000003", None)
    for probe, answer in ((first, " Paris"), (second, " 2")):
        assert probe.task == "custom" and probe.source == path and probe.answer == answer
        assert probe.context_length == len(probe.token_ids)
        assert tokenization.tokenizer.decode(probe.token_ids[probe.answer_start :]) == answer
        assert probe.answer_start + probe.answer_tokens == len(probe.token_ids)
    with pytest.raises(KvorchError, match=r"mine\.jsonl:1: the probe has \d+ tokens, more than the model's context "
                                          r"of 10; shorten its context"):  # fmt: skip
        build_probes(ProbeSpec(path), tokenization, pydoc, 10)


GOOD = {"context": "c", "question": "q", "answer": " a"}


@pytest.mark.parametrize(
    "lines,message",
    [
        ([GOOD, {"context": "c", "answer": " a"}], ":2: no field 'question'; each line needs {\"context\""),
        ([{**GOOD, "answer": 7}], ":1: field 'answer' is a number, not a string; "),
        ([{**GOOD, "context": None}], ":1: field 'context' is null, not a string; "),
        ([GOOD, "{oops"], ":2: not valid JSON ("),
        ([GOOD, "[1, 2]"], ":2: not a JSON object; "),
        ([{**GOOD, "answer": ""}], ":1: empty 'answer'; give the text the model should produce"),
        ([{**GOOD, "id": "x"}, {**GOOD, "id": "x"}], ":2: id 'x' is already used on line 1; make ids unique"),
        ([{**GOOD, "id": 3}], ":1: field 'id' is a number, not a string; quote the id"),
        ([{**GOOD, "depth": 1.5}], ":1: 'depth' must be a number in [0, 1], got 1.5; or leave it out"),
        ([{**GOOD, "depth": "mid"}], ":1: 'depth' must be a number in [0, 1], got 'mid'"),
        (["", "  "], ": no probes; write one JSON object per line"),
    ],
)
def test_bad_probe_files_name_the_line_and_the_fix(tmp_path, tokenization, pydoc, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(KvorchError) as error:
        build_probes(ProbeSpec(path), tokenization, pydoc, None)
    assert str(error.value).startswith(path + message)
    assert "\n" not in str(error.value)


def test_a_probe_file_that_is_not_utf8_names_the_line(tmp_path, tokenization, pydoc):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"context": "caf\xe9", "question": "q", "answer": " a"}\n')
    with pytest.raises(KvorchError, match=re.escape(f"{path}:2: not valid UTF-8 (byte 0xe9 at offset 16); "
                                                    "save the probe file as UTF-8")):  # fmt: skip
        build_probes(ProbeSpec(str(path)), tokenization, pydoc, None)
