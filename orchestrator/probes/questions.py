"""Question tasks: a context and a question, answered by every config in generated text.

Unlike a retrieval probe (whose answer is teacher-forced, probe.py), a question's answer is what
each config *generates* after the prompt, scored against reference answers by a metric of
workers/contract/scorers.py, as RULER, LongBench and the math sets are scored. Two sources:

- ``--task ruler:<family>`` (or ``ruler`` for every family): RULER's synthetic tasks generated
  here (orchestrator/probes/ruler.py) at ``--lengths`` from ``--seed``, ``--samples`` per length;
- a ``.jsonl`` file whose lines carry ``answers`` (a list of strings; ``answer``, one string, is
  taken as a list of one): ``context``, ``question``, ``answers``, optional ``id``, ``task``,
  ``metric`` (default :data:`DEFAULT_METRIC`), ``depth``. A file whose lines carry only
  ``answer`` is a file of teacher-forced probes (custom.py), as before.

A prompt is BOS + context + question, the two tokenized apart (the question's ids are the
document's last ``question_tokens``): the engine reads the question after the compressed
context, or inside it (``--query-aware``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.corpus import jsonl_records
from orchestrator.errors import KvorchError
from orchestrator.probes import ruler
from orchestrator.probes.build import encoder
from orchestrator.probes.custom import numbered_records
from orchestrator.probes.haystack import Encode
from orchestrator.probes.spec import ProbeSpec, check_spec, is_custom, is_ruler, length_label, ruler_families
from workers.contract import scorers
from workers.contract.tokenization import Tokenization

# A bring-your-own question without a metric: a reference answer appears in the generated text
# (RULER's string_match_part).
DEFAULT_METRIC = "ruler_part"
# A bring-your-own question's generation budget when --max-new-tokens is not given.
DEFAULT_MAX_NEW_TOKENS = 32
_SHAPE = 'each line needs {"context": "...", "question": "...", "answers": ["...", ...]}'


@dataclass(frozen=True)
class Question:
    """One question document: ``token_ids[-question_tokens:]`` are the question's own ids."""

    doc_id: str
    token_ids: list[int]  # [BOS] + context + question
    question_tokens: int
    task: str  # a RULER family, or the record's task ("custom" when it has none)
    context_length: int | None  # the requested length (RULER); None for a file's questions
    depth: float | None
    answers: tuple[str, ...]
    metric: str  # a name in workers.contract.scorers.SCORERS
    max_new_tokens: int  # the task's own budget (RULER's per family; DEFAULT_MAX_NEW_TOKENS for a file)
    source: str
    text: str  # the prompt as text (context + question), for the docs table


def is_question_task(task: str) -> bool:
    """Whether ``--task`` asks for generated answers: RULER's, or a .jsonl of questions."""
    return is_ruler(task) or (is_custom(task) and is_question_file(Path(task)))


def build_questions(
    spec: ProbeSpec, tokenization: Tokenization, max_context: int | None, max_new_tokens: int | None
) -> list[Question]:
    """The task's questions as token ids (``max_new_tokens`` None: each task's own budget)."""
    encode = encoder(tokenization)
    bos = [tokenization.bos_id] if tokenization.bos_id is not None else []
    if is_ruler(spec.task):
        return ruler_questions(spec, encode, bos, max_context, max_new_tokens)
    return file_questions(Path(spec.task), encode, bos, max_context, max_new_tokens)


def is_question_file(path: Path) -> bool:
    """Whether a .jsonl task file holds questions (its first record has ``answers``) rather than
    teacher-forced probes."""
    for _, record in jsonl_records(path, "the task file"):
        return isinstance(record, dict) and "answers" in record
    return False


def ruler_questions(
    spec: ProbeSpec, encode: Encode, bos: list[int], max_context: int | None, max_new_tokens: int | None
) -> list[Question]:
    """RULER's samples at every length, families outermost; each prompt, once tokenized apart,
    is at most its length (lengths in tokens of the run's tokenizer, BOS included)."""
    check_spec(spec, max_context)
    questions = []
    for family in ruler_families(spec.task):
        budget = max_new_tokens or ruler.TASKS[family].max_new_tokens
        for length in spec.lengths:
            _check_room(length, budget, max_context, f"--lengths {length_label(length)}")

            def count(text: str) -> int:
                return len(bos) + len(encode([text])[0])

            try:
                samples = ruler.generate(family, length, spec.samples, spec.seed, count)
            except ValueError as exc:
                raise KvorchError(f"--task {spec.task}: {exc}") from None
            for sample in samples:
                context_ids, question_ids = encode([sample.context, sample.question + sample.answer_prefix])
                questions.append(
                    Question(
                        doc_id=f"{family}-{length}-s{sample.id.rsplit('/', 1)[1]}-seed{spec.seed}",
                        token_ids=[*bos, *context_ids, *question_ids],
                        question_tokens=len(question_ids),
                        task=family,
                        context_length=length,
                        depth=sample.depth,
                        answers=sample.answers,
                        metric=sample.metric,
                        max_new_tokens=sample.max_new_tokens,
                        source="ruler",
                        text=sample.prompt,
                    )
                )
    return questions


def file_questions(
    path: Path, encode: Encode, bos: list[int], max_context: int | None, max_new_tokens: int | None
) -> list[Question]:
    """The file's questions in line order; a one-line KvorchError naming file:line for a bad one."""
    questions: list[Question] = []
    budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    for where, doc_id, fields in numbered_records(path, "the task file", _fields):
        context_ids, question_ids = encode([fields["context"], fields["question"]])
        token_ids = [*bos, *context_ids, *question_ids]
        _check_room(len(token_ids), budget, max_context, f"{where}: the prompt's {len(token_ids)} tokens")
        questions.append(
            Question(
                doc_id=doc_id,
                token_ids=token_ids,
                question_tokens=len(question_ids),
                task=fields.get("task", "custom"),
                context_length=None,
                depth=fields.get("depth"),
                answers=fields["answers"],
                metric=fields.get("metric", DEFAULT_METRIC),
                max_new_tokens=budget,
                source=str(path),
                text=fields["context"] + fields["question"],
            )
        )
    if not questions:
        raise KvorchError(f"{path}: no questions; write one JSON object per line ({_SHAPE})")
    return questions


def answers_json(answers: tuple[str, ...]) -> str:
    """How the docs table records a question's reference answers."""
    return json.dumps(list(answers), ensure_ascii=False)


def _check_room(prompt_tokens: int, max_new_tokens: int, max_context: int | None, what: str) -> None:
    if max_context is not None and prompt_tokens + max_new_tokens > max_context:
        raise KvorchError(
            f"{what} plus {max_new_tokens} generated tokens exceed the model's context of {max_context}; "
            f"use prompts of at most {max_context - max_new_tokens} tokens or a smaller --max-new-tokens"
        )


def _fields(record: object, where: str) -> dict:
    """A question record's fields, checked; ``answer`` (one string) reads as ``answers`` of one."""
    if not isinstance(record, dict):
        raise KvorchError(f"{where}: not a JSON object; {_SHAPE}")
    if "answers" not in record and isinstance(record.get("answer"), str):
        record = {**record, "answers": [record["answer"]]}
    for name in ("context", "question"):
        if not isinstance(record.get(name), str):
            raise KvorchError(f"{where}: field {name!r} is missing or not a string; {_SHAPE}")
    answers = record.get("answers")
    if not isinstance(answers, list):
        raise KvorchError(f"{where}: 'answers' is missing or not a list; {_SHAPE}")
    try:
        scorers.check_answers(answers)
    except ValueError as exc:
        raise KvorchError(f"{where}: {exc}") from None
    metric = record.get("metric", DEFAULT_METRIC)
    if metric not in scorers.SCORERS:
        raise KvorchError(f"{where}: unknown metric {metric!r}; use one of {', '.join(scorers.SCORERS)}")
    for name in ("id", "task"):
        if name in record and (not isinstance(record[name], str) or not record[name]):
            raise KvorchError(f"{where}: field {name!r} must be a non-empty string; quote it or leave it out")
    depth = record.get("depth")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
        raise KvorchError(f"{where}: 'depth' must be a number in [0, 1], got {depth!r}; or leave it out")
    return {**record, "answers": tuple(answers)}
