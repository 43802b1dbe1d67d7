"""A run's documents as token ids: the corpus's first --max-docs, retrieval probes or question
tasks (--task).

All become :class:`TokenizedDocument`; a probe also carries its answer span, a question its
question and reference answers, both their cell (task, length, depth), which the docs table
records and sql/retrieval.sql and the answers view group by.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from orchestrator.corpus import Document
from orchestrator.errors import KvorchError
from orchestrator.probes import ProbeSpec, build_probes, build_questions, is_question_task
from orchestrator.probes.questions import answers_json
from orchestrator.sweep.planner import TokenizedDocument
from orchestrator.sweep.spec import JobSpec
from workers.contract import memory
from workers.contract.schema import DOC_SCHEMA
from workers.contract.tokenization import Tokenization


def run_documents(spec: JobSpec, tokens: Tokenization, corpus: list[Document]) -> list[TokenizedDocument]:
    """The documents ``spec`` evaluates, each problem a one-line KvorchError before any task."""
    if spec.task is None:
        return [TokenizedDocument(d, tokens.ids(d.text, spec.max_tokens)) for d in corpus[: spec.max_docs]]
    probe_spec = ProbeSpec(spec.task, spec.lengths, spec.depths, spec.samples, spec.seed)
    if is_question_task(spec.task):
        return [
            TokenizedDocument(Document(q.doc_id, q.text, q.source), q.token_ids, question=q)
            for q in build_questions(probe_spec, tokens, model_context(spec.model), spec.max_new_tokens)
        ]
    probes = build_probes(probe_spec, tokens, corpus, model_context(spec.model))
    return [
        TokenizedDocument(
            Document(p.doc_id, tokens.tokenizer.decode(p.token_ids), p.source), list(p.token_ids), probe=p
        )
        for p in probes
    ]


def model_context(model: str) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), or None when
    its config does not say: a probe longer than that would measure extrapolation, not eviction."""
    try:
        config = memory.model_config(model)
    except ValueError as exc:
        raise KvorchError(f"--task needs the model's context length, but its config cannot be read ({exc})") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def docs_table(docs: list[TokenizedDocument]) -> pa.Table:
    """The run's docs table (DOC_SCHEMA): what each document is, and a probe's cell and answer."""
    rows = []
    for d in docs:
        probe, question = d.probe, d.question
        cell = probe or question
        rows.append(
            {
                "doc_id": d.document.doc_id,
                "source": d.document.source,
                "n_chars": len(d.document.text),
                "n_tokens": len(d.token_ids),
                "sha256": hashlib.sha256(d.document.text.encode()).hexdigest(),
                "task": cell.task if cell else None,
                "context_length": cell.context_length if cell else None,
                "depth": cell.depth if cell else None,
                "answer": probe.answer if probe else None,
                "answer_tokens": probe.answer_tokens if probe else None,
                "answers": answers_json(question.answers) if question else None,
                "metric": question.metric if question else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)
