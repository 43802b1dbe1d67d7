"""The plan types the driver and the actors exchange: tasks, their documents and results, and
the worker's settings. Small on purpose, and free of the engine: the driver imports these (and
``workers.contract.settings``) and nothing else of the worker side's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from workers.contract.configs import EvalConfig
from workers.contract.settings import EngineSettings, GenerationSettings

# The label of a preflight failure that concerns the model, not one config.
MODEL_LEVEL = ""


@dataclass(frozen=True)
class AnswerSpan:
    """A retrieval probe's answer: the document's tokens [start, start + tokens), teacher-forced.

    The chunk step scores it like every other target and also sums, per chunk, the NLL and top-1 hits
    of the answer tokens alone; the answer is exactly matched when all of them are hits, which
    is what greedy decoding would produce.
    """

    start: int
    tokens: int

    def __post_init__(self) -> None:
        if self.start < 1 or self.tokens < 1:
            raise ValueError(f"an answer span needs start >= 1 and tokens >= 1, got {self.start}, {self.tokens}")

    @property
    def predicted_from(self) -> int:
        """The first position whose prediction is an answer token (the one before it)."""
        return self.start - 1

    def targets_in(self, start: int, n_targets: int) -> int:
        """Answer tokens among the targets of the predictions at [start, start + n_targets)."""
        lo, hi = max(start, self.predicted_from), min(start + n_targets, self.predicted_from + self.tokens)
        return max(0, hi - lo)


@dataclass(frozen=True)
class TaskDocument:
    doc_id: str
    token_ids: list[int]
    # A retrieval probe's answer: its last ``answer_tokens`` tokens (0: a corpus document).
    answer_tokens: int = 0
    # A question task: the last ``question_tokens`` tokens are the question after the context,
    # every config generates an answer, and ``metric`` scores it against ``answers``
    # (workers/contract/scorers.py). Empty ``answers``: no question.
    question_tokens: int = 0
    answers: tuple[str, ...] = ()
    metric: str = ""

    @property
    def is_question(self) -> bool:
        return bool(self.answers)

    @property
    def answer(self) -> AnswerSpan | None:
        if not self.answer_tokens:
            return None
        return AnswerSpan(len(self.token_ids) - self.answer_tokens, self.answer_tokens)


@dataclass(frozen=True)
class Task:
    """A shard of documents under a group of configs: the unit of scheduling and of part files."""

    task_id: str
    documents: tuple[TaskDocument, ...]
    configs: tuple[EvalConfig, ...]

    @property
    def cost(self) -> int:
        """Token-configs to evaluate: what the scheduler balances and orders by."""
        return sum(len(d.token_ids) for d in self.documents) * len(self.configs)


@dataclass(frozen=True)
class ConfigFailure:
    """A config that raised on one document: only its rows of that document are missing."""

    doc_id: str
    config: str  # the config's label
    reason: str  # "ExceptionType: first line of its message"


@dataclass(frozen=True)
class TaskResult:
    """What a task sends back: its rows (one Arrow table, through the object store) and the
    configs that failed on some of its documents, whose rows are absent from ``rows``."""

    rows: pa.Table
    failures: tuple[ConfigFailure, ...] = ()
    # Seconds this task spent compiling chunk steps (a warm-up chunk included), on ``worker``:
    # kept apart from the rows' forward_seconds, so throughput never counts a compile.
    compile_seconds: float = 0.0
    worker: str = ""


@dataclass(frozen=True)
class WorkerSettings:
    model: str
    dtype: str
    device: str
    threads: int
    engine: EngineSettings
    # The on-disk cache of compiled steps (workers/engine/compile_cache.py); None: torch's default.
    compile_cache: str | None = None
    # How question tasks are answered (their documents' ``answers``); other documents ignore it.
    generation: GenerationSettings = GenerationSettings()


@dataclass(frozen=True)
class DocumentScores:
    """Per config (in ``configs`` order): [layers, kv-heads, positions] of the last score each key
    got and whether it was still kept when the document ended."""

    configs: list[str]
    scores: torch.Tensor  # [configs, layers, kv-heads, positions] float32
    kept: torch.Tensor  # same shape, bool
