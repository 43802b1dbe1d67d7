"""Planning: tokenized documents x configs -> tasks (shard x config group).

Shards balance documents by token count (longest first onto the lightest shard), config
groups keep the configs of one press together so they share a batch. Task ids are derived from
the plan alone, so the same spec always yields the same tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.corpus import Document
from orchestrator.errors import KvorchError
from orchestrator.probes import Probe, Question
from workers.contract.configs import EvalConfig
from workers.contract.plan import Task, TaskDocument

SHARDS_PER_ACTOR = 4


@dataclass(frozen=True)
class TokenizedDocument:
    document: Document
    token_ids: list[int]
    probe: Probe | None = None  # a retrieval probe (--task): its answer is the last tokens
    question: Question | None = None  # a question task (--task): its question is the last tokens


def task_document(d: TokenizedDocument) -> TaskDocument:
    """What an actor needs of a document: its ids, and a probe's answer span or a question's."""
    if d.question is not None:
        q = d.question
        return TaskDocument(
            d.document.doc_id, d.token_ids, question_tokens=q.question_tokens, answers=q.answers, metric=q.metric
        )
    return TaskDocument(d.document.doc_id, d.token_ids, d.probe.answer_tokens if d.probe else 0)


def check_lengths(docs: list[TokenizedDocument], chunk_size: int) -> None:
    short = [d for d in docs if len(d.token_ids) < chunk_size]
    if short:
        first = short[0]
        raise KvorchError(
            f"document {first.document.doc_id!r} has {len(first.token_ids)} tokens, shorter than one chunk "
            f"({chunk_size}){f' (and {len(short) - 1} more)' if len(short) > 1 else ''}; "
            "lower --chunk-size or remove short documents from the corpus"
        )


def shard(docs: list[TokenizedDocument], n_shards: int) -> list[list[TokenizedDocument]]:
    """Greedy longest-processing-time partition by token count; empty shards dropped."""
    shards: list[list[TokenizedDocument]] = [[] for _ in range(max(1, min(n_shards, len(docs))))]
    loads = [0] * len(shards)
    for doc in sorted(docs, key=lambda d: (-len(d.token_ids), d.document.doc_id)):
        lightest = loads.index(min(loads))
        shards[lightest].append(doc)
        loads[lightest] += len(doc.token_ids)
    return shards


def group_configs(configs: list[EvalConfig], batch_configs: int, agreement: bool = False) -> list[list[EvalConfig]]:
    """Consecutive groups of at most ``batch_configs``, configs of one press kept adjacent.

    With ``agreement`` every forward needs the baseline as its reference row: it joins the first
    group, and the engine adds it, unwritten, to every other one, so those take one config less
    and no forward runs more than ``batch_configs`` rows.
    """
    first_seen: dict = {}
    for config in configs:
        first_seen.setdefault(config.press, len(first_seen))
    ordered = sorted(configs, key=lambda c: first_seen[c.press])
    baseline = [c for c in ordered if c.is_baseline] if agreement else []
    if not baseline:
        return [ordered[i : i + batch_configs] for i in range(0, len(ordered), batch_configs)]
    others = [c for c in ordered if not c.is_baseline]
    size = max(1, batch_configs - 1)
    groups = [others[i : i + size] for i in range(0, len(others), size)] or [[]]
    groups[0] = baseline + groups[0]
    return groups


def default_shards(n_actors: int) -> int:
    """Enough shards that a pool stays busy while the longest ones finish."""
    return n_actors * SHARDS_PER_ACTOR


def plan_tasks(
    docs: list[TokenizedDocument],
    configs: list[EvalConfig],
    n_shards: int,
    batch_configs: int,
    agreement: bool = False,
) -> list[Task]:
    """Tasks ordered longest first, the order in which actors pull them.

    The plan depends only on its arguments, which the run's spec.json records, so a resume on
    a pool of another size plans the very same task ids.
    """
    tasks = [
        Task(
            task_id=f"s{si:04d}-g{gi:03d}",
            documents=tuple(task_document(d) for d in shard_docs),
            configs=tuple(group),
        )
        for si, shard_docs in enumerate(shard(docs, n_shards))
        for gi, group in enumerate(group_configs(configs, batch_configs, agreement))
    ]
    return sorted(tasks, key=lambda t: (-t.cost, t.task_id))
