"""Question tasks on the driver (orchestrator/probes/questions.py, the submit options): RULER's
tasks and bring-your-own JSONL questions as token ids, the docs table, the options, every user
error in one line before anything is written, and one real run whose answers reach the lake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.corpus import Document
from orchestrator.errors import KvorchError
from orchestrator.probes import ProbeSpec, build_questions, is_question_task
from orchestrator.probes.questions import DEFAULT_MAX_NEW_TOKENS, DEFAULT_METRIC
from orchestrator.sweep.documents import docs_table
from orchestrator.sweep.planner import TokenizedDocument, task_document
from orchestrator.sweep.spec import JobSpec
from workers.contract.tokenization import resolve


@pytest.fixture(scope="session")
def tokenization(smollm2_tokenizer):
    return resolve(smollm2_tokenizer, "auto")


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_ruler_questions_are_prompts_of_their_length_ending_in_the_question(tokenization):
    spec = ProbeSpec("ruler:niah_single_1+variable_tracking", lengths=(1024,), samples=2, seed=3)
    questions = build_questions(spec, tokenization, 8192, None)
    assert [q.task for q in questions] == ["niah_single_1"] * 2 + ["variable_tracking"] * 2
    for q in questions:
        assert 0.9 * 1024 <= len(q.token_ids) <= 1024 + 2  # parts tokenized apart may differ by a token
        assert q.token_ids[0] == tokenization.bos_id
        question = tokenization.tokenizer.decode(q.token_ids[-q.question_tokens :])
        assert question.rstrip().endswith(("is", "are:"))  # RULER's answer prefix ends the prompt
        context = tokenization.tokenizer.decode(q.token_ids[1 : -q.question_tokens])
        assert all(answer in context for answer in q.answers)
        assert q.metric == "ruler_all" and q.context_length == 1024
    assert questions[0].max_new_tokens == 128 and questions[2].max_new_tokens == 30  # RULER's budgets
    again = build_questions(spec, tokenization, 8192, None)
    assert [q.token_ids for q in again] == [q.token_ids for q in questions]


def test_a_jsonl_of_questions_reads_answers_metric_and_task(tmp_path, tokenization):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"context": "Paris is the capital of France.", "question": " Capital of France?", "answers": ["Paris"]},
            {"id": "m1", "context": "2+2", "question": " =?", "answer": "4", "metric": "exact_match", "task": "math"},
        ],
    )
    assert is_question_task(path)
    questions = build_questions(ProbeSpec(path), tokenization, 8192, None)
    first, second = questions
    assert first.answers == ("Paris",) and first.metric == DEFAULT_METRIC and first.task == "custom"
    assert second.doc_id == "m1" and second.answers == ("4",) and second.metric == "exact_match"
    assert first.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    question_ids = tokenization.tokenizer(" Capital of France?", add_special_tokens=False)["input_ids"]
    assert first.token_ids[-first.question_tokens :] == question_ids
    docs = [TokenizedDocument(Document(q.doc_id, q.text, q.source), q.token_ids, question=q) for q in questions]
    table = docs_table(docs).to_pylist()
    assert [json.loads(r["answers"]) for r in table] == [["Paris"], ["4"]]
    assert [r["metric"] for r in table] == [DEFAULT_METRIC, "exact_match"]
    task_doc = task_document(docs[1])
    assert task_doc.is_question and task_doc.question_tokens == second.question_tokens
    assert task_doc.answers == ("4",) and task_doc.metric == "exact_match"


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"context": "c", "question": "q", "answers": []}, "answers is an empty list"),
        ({"context": "c", "question": "q", "answers": [""]}, "every answer must be a non-empty string"),
        ({"context": "c", "question": "q", "answers": [4]}, "every answer must be a non-empty string"),
        ({"context": "c", "question": "q", "answers": "4"}, "'answers' is missing or not a list"),
        ({"context": "c", "answers": ["4"]}, "field 'question' is missing or not a string"),
        ({"context": "c", "question": "q", "answers": ["4"], "metric": "bleu"}, "unknown metric 'bleu'"),
        ({"context": "c", "question": "q", "answers": ["4"], "depth": 2}, "'depth' must be a number in [0, 1]"),
    ],
)
def test_a_bad_question_record_is_one_line_naming_file_line_and_fix(tmp_path, tokenization, record, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "question": "q", "answers": ["a"]}, record])
    with pytest.raises(KvorchError) as excinfo:
        build_questions(ProbeSpec(path), tokenization, 8192, None)
    message = str(excinfo.value)
    assert message.startswith(f"{path}:2: ") and fragment in message and "\n" not in message


def test_a_prompt_and_its_answer_past_the_models_context_are_refused(tmp_path, tokenization):
    path = write_jsonl(tmp_path / "long.jsonl", [{"context": "word " * 50, "question": " q", "answers": ["a"]}])
    with pytest.raises(KvorchError, match=r"plus 32 generated tokens exceed the model's context of 60"):
        build_questions(ProbeSpec(path), tokenization, 60, None)
    with pytest.raises(KvorchError, match=r"--lengths 1k plus 128 generated tokens exceed the model's context"):
        build_questions(ProbeSpec("ruler:niah_single_1", lengths=(1024,)), tokenization, 1100, None)


def test_generation_options_reach_the_spec_and_its_fingerprint_only_when_set():
    plain = JobSpec(methods=("baseline",), task="ruler:niah_single_1")
    assert not {"max_new_tokens", "protocol", "query_aware", "decode_eviction"} & set(plain.to_json())
    once = JobSpec(methods=("baseline",), task="ruler:niah_single_1", protocol="once", max_new_tokens=8)
    assert once.to_json()["protocol"] == "once" and once.to_json()["max_new_tokens"] == 8
    assert once.generation_settings(128).max_new_tokens == 8
    assert plain.generation_settings(128).max_new_tokens == 128 and plain.generation_settings(1).protocol == "chunked"
    stopped = JobSpec(methods=("baseline",), task="ruler:niah_single_1", stop=("\n",), decode_interval=4)
    assert stopped.to_json()["stop"] == ["\n"] and stopped.to_json()["decode_interval"] == 4
    assert stopped.generation_settings(8).stop == ("\n",) and stopped.generation_settings(8).decode_interval == 4


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--max-new-tokens", "4"], "--max-new-tokens goes with a question task; add --task ruler"),
        (["--task", "passkey", "--protocol", "once"], "--protocol goes with a question task"),
        (["--task", "ruler:niah_single_1", "--max-new-tokens", "0"], "--max-new-tokens: max new tokens must be >= 1"),
        (
            ["--task", "ruler:niah_single_1", "--decode-interval", "0"],
            "--decode-interval: decode interval must be >= 1",
        ),
        (["--task", "ruler:niah_single_1", "--stop", ""], "--stop: stop string '' would end every answer"),
        (["--task", "ruler:niah_single_1", "--stop", "a\\"], "in a stop string; write a backslash as"),
        (["--task", "passkey", "--stop", "x"], "--stop goes with a question task"),
        (["--task", "ruler:nope"], "unknown RULER task 'nope'"),
        (["--task", "ruler:niah_single_1", "--depths", "0.5"], "RULER's tasks spread their needles themselves"),
    ],
)
def test_bad_question_options_are_one_line_and_write_nothing(tmp_path, extra, fragment):
    lake = tmp_path / "lake"
    result = CliRunner().invoke(main, ["submit", "--methods", "baseline", "--lake", str(lake), *extra])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and fragment in lines[0], result.output
    assert not lake.exists()


def test_a_question_run_writes_each_configs_scored_answer(local_ray, tmp_path, tiny_model_dir):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"id": f"q{i}", "context": "The code is 1234. " * 20, "question": " The code is", "answers": ["1234"]}
         for i in range(2)],
    )  # fmt: skip
    lake = tmp_path / "lake"
    args = ["submit", "--model", tiny_model_dir, "--methods", "baseline,window", "--task", path,
            "--chunk-size", "32", "--window", "32", "--max-new-tokens", "5", "--protocol", "once",
            "--lake", str(lake), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "== answers ==" in result.output
    sql = CliRunner().invoke(
        main, ["sql", "--lake", str(lake), "--format", "json",
               "SELECT doc_id, config, n_generated, stop_reason, score FROM answers ORDER BY doc_id, config"],
    )  # fmt: skip
    rows = json.loads(sql.stdout)
    assert [(r["doc_id"], r["config"]) for r in rows] == [(d, c) for d in ("q0", "q1") for c in ("baseline", "window")]
    assert all(1 <= r["n_generated"] <= 5 and r["score"] in (0.0, 1.0) for r in rows)
    spec = json.loads(next(lake.glob("runs/run_id=*/spec.json")).read_text())
    assert spec["protocol"] == "once" and spec["max_new_tokens"] == 5
