"""Bring-your-own probes: a JSONL file, one probe per line.

Each line is an object with string fields ``context``, ``question`` and ``answer`` (not empty),
an optional string ``id`` (default ``<file stem>-<line number, 6 digits>``) and an optional
``depth`` (a number in [0, 1], recorded as given; kvorch does not move anything). Other fields
are ignored. The sequence is BOS + context + "\\n" + question + answer, each part tokenized on
its own (no newline is added when the context ends with one or the question starts with one);
nothing is cut, so the answer is scored as what the model should produce right after the
question. The natural form is accepted: an answer that starts with a letter or digit after a
question that ends with one or with ``:?.!,;`` (``"answer": "magenta"`` after ``"...is:"``) is
scored with one space in between, as a model writes it (``" magenta"``); an answer or a question
that already has whitespace there, or any other join (``"A-"`` then ``"17"``), is taken as given.
Without that space a tokenizer that glues the space to the word (BPE, SentencePiece) asks for
a token the model never predicts there, and every config, baseline included, scores 0. The
spec's lengths, depths, samples and seed do not apply: the file is the probe set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator.corpus import jsonl_records
from orchestrator.errors import KvorchError
from orchestrator.probes.haystack import Encode
from orchestrator.probes.probe import Probe, assemble
from orchestrator.probes.spec import CUSTOM_TASK

REQUIRED = ("context", "question", "answer")
QUESTION_SEPARATOR = "\n"
_SHAPE = 'each line needs {"context": "...", "question": "...", "answer": "..."}'


def read_probes(path: Path, encode: Encode, bos: list[int], max_context: int | None) -> list[Probe]:
    """The file's probes in line order; one-line KvorchError naming file:line for a bad one."""
    probes: list[Probe] = []
    for where, doc_id, fields in numbered_records(path, "the probe file", _fields):
        context, question, answer = (fields[name] for name in REQUIRED)
        separator = "" if not context or context.endswith("\n") or question.startswith("\n") else QUESTION_SEPARATOR
        answer = scored_answer(question, answer)
        context_ids, question_ids, answer_ids = encode([context, separator + question, answer])
        probe = assemble(
            doc_id,
            prefix=bos,
            context=context_ids,
            question=question_ids,
            answer=answer_ids,
            task=CUSTOM_TASK,
            context_length=None,
            depth=fields.get("depth"),
            answer_text=answer,
            source=str(path),
        )
        if max_context is not None and len(probe.token_ids) > max_context:
            raise KvorchError(
                f"{where}: the probe has {len(probe.token_ids)} tokens, more than the model's context of "
                f"{max_context}; shorten its context"
            )
        probes.append(probe)
    if not probes:
        raise KvorchError(f"{path}: no probes; write one JSON object per line ({_SHAPE})")
    return probes


# Where a space between question and answer is certain: after a word, a number or a sentence's
# punctuation, before a word or a number. Other joins (a hyphen, a bracket, a quote) are left as given.
_SPACED_AFTER = frozenset(":?.!,;")


def scored_answer(question: str, answer: str) -> str:
    """The answer text as scored: ``answer`` with one leading space where the natural form leaves
    it out unambiguously (module docstring), else ``answer`` as given."""
    if not answer[:1].isalnum() or not question:
        return answer
    last = question[-1]
    return f" {answer}" if last.isalnum() or last in _SPACED_AFTER else answer


def numbered_records(path: Path, what: str, check: Callable[[object, str], dict]) -> Iterator[tuple[str, str, dict]]:
    """(``file:line``, id, checked fields) of each record of a task file: the record's ``id``, or
    ``<file stem>-<line number, 6 digits>``; an id used twice is a one-line KvorchError."""
    lines: dict[str, int] = {}
    for number, record in jsonl_records(path, what):
        where = f"{path}:{number}"
        fields = check(record, where)
        doc_id = fields.get("id", f"{path.stem}-{number:06d}")
        if doc_id in lines:
            raise KvorchError(f"{where}: id {doc_id!r} is already used on line {lines[doc_id]}; make ids unique")
        lines[doc_id] = number
        yield where, doc_id, fields


def _fields(record: object, where: str) -> dict:
    """The record's fields, checked: the required strings, an answer, a string id, a depth."""
    if not isinstance(record, dict):
        raise KvorchError(f"{where}: not a JSON object; {_SHAPE}")
    for name in REQUIRED:
        if name not in record:
            raise KvorchError(f"{where}: no field {name!r}; {_SHAPE}")
        if not isinstance(record[name], str):
            raise KvorchError(f"{where}: field {name!r} is {_kind(record[name])}, not a string; {_SHAPE}")
    if not record["answer"]:
        raise KvorchError(f"{where}: empty 'answer'; give the text the model should produce after the question")
    if "id" in record and not isinstance(record["id"], str):
        raise KvorchError(f"{where}: field 'id' is {_kind(record['id'])}, not a string; quote the id")
    if "depth" in record:
        depth = record["depth"]
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or math.isnan(depth) or not 0 <= depth <= 1:
            raise KvorchError(f"{where}: 'depth' must be a number in [0, 1], got {depth!r}; or leave it out")
        record = {**record, "depth": float(depth)}
    return record


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a list" if isinstance(value, list) else "an object"
