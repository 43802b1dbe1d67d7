"""build_probes: a ProbeSpec and a tokenizer to the probe documents, every check first.

Each probe is seeded by its own name (task, length, depth, sample, seed), never by the global
RNG or ``hash()``, so the same spec, tokenizer and haystack give the same ids in any process
and adding a length does not change the other probes. Built-in probes are exactly their
length: BOS, then the filler with the fact inside it, then the question and the answer, each
part tokenized on its own and the ids concatenated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from orchestrator.corpus import Document
from orchestrator.errors import KvorchError
from orchestrator.probes.custom import QUESTION_SEPARATOR, read_probes
from orchestrator.probes.filler import cut, insertion_point
from orchestrator.probes.haystack import Encode, Haystack
from orchestrator.probes.probe import Probe, assemble
from orchestrator.probes.spec import ProbeSpec, check_spec, check_task, depth_label, is_custom, length_label
from orchestrator.probes.tasks import KeyValue, Needle, Parts, Passkey, Task
from workers.contract.tokenization import Tokenization


@dataclass(frozen=True)
class _Plan:
    """One probe before its filler: its parts tokenized, its RNG ready for the filler."""

    doc_id: str
    length: int
    depth: float
    rng: random.Random
    parts: Parts
    fact: list[int]
    question: list[int]
    answer: list[int]
    fixed_tokens: int  # BOS + fact + question + answer

    @property
    def filler_tokens(self) -> int:
        return self.length - self.fixed_tokens


def build_probes(
    spec: ProbeSpec, tokenization: Tokenization, haystack: list[Document], max_context: int | None
) -> list[Probe]:
    """The spec's probes, lengths outermost, then depths, then samples. ``haystack`` is the
    run's corpus (only needle reads it); ``max_context`` the model's context window (None: no
    limit). Bad input, a corpus too small for needle included, is a one-line KvorchError raised
    before any probe is built."""
    check_task(spec.task)
    encode = encoder(tokenization)
    bos = [tokenization.bos_id] if tokenization.bos_id is not None else []
    if is_custom(spec.task):
        return read_probes(Path(spec.task), encode, bos, max_context)
    check_spec(spec, max_context)
    task = _task(spec.task, encode, haystack)
    plans = [
        _plan(task, spec.seed, length, float(depth) + 0.0, sample, encode, len(bos))
        for length in spec.lengths
        for depth in spec.depths
        for sample in range(spec.samples)
    ]
    _check_room(plans, task, encode, len(bos))
    if isinstance(task, Needle):
        _check_haystack(plans, task.haystack)
    return [_build(plan, task, bos) for plan in plans]


def encoder(tokenization: Tokenization) -> Encode:
    """Texts to ids, each text alone and without special tokens (kvorch adds BOS itself)."""

    def encode(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in tokenization.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return encode


def _task(name: str, encode: Encode, haystack: list[Document]) -> Task:
    if name == "passkey":
        return Passkey(encode)
    if name == "kv":
        return KeyValue(encode)
    stack = Haystack(haystack, encode)
    if not stack.documents:
        raise KvorchError("--task needle hides its fact in the corpus, which has no text; pass a --corpus with text")
    return Needle(stack)


def _plan(task: Task, seed: int, length: int, depth: float, sample: int, encode: Encode, bos: int) -> _Plan:
    name = f"{task.name}-{length}-d{depth_label(depth)}-s{sample}"
    rng = random.Random(f"{name}-{seed}")
    parts = task.parts(rng)
    fact, question, answer = encode([parts.fact, QUESTION_SEPARATOR + parts.question, parts.answer])
    fixed = bos + len(fact) + len(question) + len(answer)
    return _Plan(name, length, depth, rng, parts, fact, question, answer, fixed)


def _check_room(plans: list[_Plan], task: Task, encode: Encode, bos: int) -> None:
    """Every length holds a fact, question and answer of the task plus some filler. The minimum
    is the task's (the longest of a fixed spread of its parts, every needle city included, or of
    this build's, if one is longer), not each length's own probes': those differ by length (a
    longer city), and a minimum that moved with the length would reject the length it named."""
    spread = task.spread()
    texts = [text for parts in spread for text in (parts.fact, QUESTION_SEPARATOR + parts.question, parts.answer)]
    ids = encode(texts)
    needs = [bos + sum(map(len, ids[i : i + 3])) + task.min_filler(len(ids[i])) for i in range(0, len(ids), 3)]
    needs += [plan.fixed_tokens + task.min_filler(len(plan.fact)) for plan in plans]
    minimum = max(needs)
    for plan in plans:
        if plan.length < minimum:
            raise KvorchError(
                f"--lengths {length_label(plan.length)}: too short for a {task.name} probe, which needs at least "
                f"{minimum} tokens (its fact, question and answer plus some filler); use lengths >= {minimum}"
            )


def _check_haystack(plans: list[_Plan], haystack: Haystack) -> None:
    """The corpus holds the longest needle probe's filler (each probe reads a sentence once)."""
    plan = max(plans, key=lambda p: p.filler_tokens)
    total = haystack.tokens(enough=plan.filler_tokens)
    if total < plan.filler_tokens:
        longest = plan.length - plan.filler_tokens + total
        raise KvorchError(
            f"--lengths {length_label(plan.length)}: a needle probe needs {plan.filler_tokens} tokens of corpus "
            f"text but the corpus has {total}; use a larger --corpus or lengths <= {longest}"
        )


def _build(plan: _Plan, task: Task, bos: list[int]) -> Probe:
    keep_tail = plan.depth >= 0.5  # the cut unit goes to the end of the filler away from the fact
    filler = cut(task.units(plan.rng, plan.parts), plan.filler_tokens, keep_tail)
    assert filler is not None, "filler ran out: _check_haystack should have refused this length"
    at = insertion_point(filler, plan.depth, task.always_snap)
    return assemble(
        plan.doc_id,
        prefix=bos,
        context=[*filler.ids[:at], *plan.fact, *filler.ids[at:]],
        question=plan.question,
        answer=plan.answer,
        task=task.name,
        context_length=plan.length,
        depth=plan.depth,
        answer_text=plan.parts.answer,
        source=";".join(filler.origins),
    )
