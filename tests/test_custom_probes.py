"""Bring-your-own probes as a researcher writes them (issue 39, point 2): the natural form
(``"answer": "magenta"``, no leading space) is scored as the model writes it, and a probe the
uncompressed baseline misses is named, in one line, by ``kvorch report`` and ``kvorch submit``."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.corpus import load_corpus
from orchestrator.lake.store import Lake
from orchestrator.probes import ProbeSpec, build_probes
from orchestrator.probes.custom import scored_answer
from orchestrator.reports.tables import RunReport
from tests.test_lake_and_report import row
from workers.contract.schema import ROW_SCHEMA
from workers.contract.tokenization import resolve


@pytest.fixture(scope="module")
def tokenization(smollm2_tokenizer):
    return resolve(smollm2_tokenizer, "auto")


@pytest.fixture(scope="module")
def pydoc():
    return load_corpus("pydoc")


def sublist_at(haystack: list[int], needle: list[int]) -> int:
    return next((i for i in range(len(haystack) - len(needle) + 1) if haystack[i : i + len(needle)] == needle), -1)


@pytest.mark.parametrize(
    "question,answer",
    [
        ("What colour is the secret? The secret colour is:", "magenta"),
        ("Which colour is the secret?", "magenta"),
        ("The secret colour is", "magenta"),
    ],
)
def test_a_natural_answer_is_scored_as_the_word_the_model_writes(tmp_path, tokenization, pydoc, question, answer):
    """The answer's token ids are exactly those the same word has inside a sentence of the
    context (where the tokenizer glues the space to it): an independent reference of "what the
    model would write next", not kvorch's own rule."""
    path = tmp_path / "mine.jsonl"
    context = "Remember this. The secret colour is magenta. Nothing else matters."
    path.write_text(json.dumps({"id": "p", "context": context, "question": question, "answer": answer}) + "\n")
    (probe,) = build_probes(ProbeSpec(str(path)), tokenization, pydoc, None)
    answer_ids = probe.token_ids[probe.answer_start :]
    context_ids = tokenization.tokenizer(context, add_special_tokens=False)["input_ids"]
    assert sublist_at(context_ids, answer_ids) >= 0, (answer_ids, context_ids)
    assert tokenization.tokenizer.decode(answer_ids) == " magenta" == probe.answer


@pytest.mark.parametrize(
    "question,answer,scored",
    [
        ("The code is", " 4711", " 4711"),  # a leading space given: as given
        ("The code is ", "4711", "4711"),  # the question ends with the space: as given
        ("The code is\n", "4711", "4711"),
        ("The part is A-", "17", "17"),  # a hyphen: gluing may be meant, so as given
        ("The list:", "(a)", "(a)"),  # an answer that starts with punctuation: as given
        ("The code is:", "4711", " 4711"),
        ("Colour?", "magenta", " magenta"),
    ],
)
def test_the_space_is_added_only_where_it_is_unambiguous(question, answer, scored):
    assert scored_answer(question, answer) == scored


def probe_lake(tmp_path, baseline_answers: dict[str, bool]) -> Lake:
    """A run of retrieval probes whose baseline answers the probes marked True (2 answer tokens each)."""
    lake = Lake(str(tmp_path / "lake"))
    lake.write_spec("r1", {"model": "m", "task": "mine.jsonl"})
    rows = []
    for doc, answered in baseline_answers.items():
        for method, config, correct in (("baseline", "baseline", 2 if answered else 1), ("knorm", "knorm@-2", 0)):
            rows.append({**row(doc, 0, method, config, 10.0, 10, 5, 0, 0, 0, 0),
                         "answer_tokens": 2, "answer_correct": correct, "answer_nll_sum": 1.0})  # fmt: skip
    lake.write_rows("r1", "t0", pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    return lake


def test_report_names_the_probes_baseline_misses_in_one_line(tmp_path):
    lake = probe_lake(tmp_path, {"p1": True, "p2": False, "p3": False})
    (line,) = RunReport(lake).probe_warnings()
    assert "baseline misses 2 of 3 probes (p2, p3)" in line and "\n" not in line
    result = CliRunner().invoke(main, ["report", "--table", "retrieval", "--lake", lake.uri])
    assert result.exit_code == 0, result.output
    assert line in result.stderr


def test_no_warning_when_baseline_answers_every_probe(tmp_path):
    lake = probe_lake(tmp_path, {"p1": True, "p2": True})
    assert RunReport(lake).probe_warnings() == []
    result = CliRunner().invoke(main, ["report", "--table", "retrieval", "--lake", lake.uri])
    assert result.exit_code == 0 and "misses" not in result.stderr
