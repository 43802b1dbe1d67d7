"""The body of a kvorch worker actor: loads the model once, then evaluates tasks.

This is a plain class; the driver turns it into a Ray actor (``ray.remote``) with the resources
it needs, so the worker side stays importable and testable without Ray. Inside Ray it exports
custom metrics (``ray.util.metrics``) that the Ray dashboard and Prometheus pick up.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import platform
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray
import torch
from ray.util import metrics

from workers.contract import scorers, stopping
from workers.contract.configs import EvalConfig
from workers.contract.errors import error_line
from workers.contract.models import load_model, load_tokenizer
from workers.contract.plan import (
    MODEL_LEVEL,
    ConfigFailure,
    DocumentScores,
    Task,
    TaskDocument,
    TaskResult,
    WorkerSettings,
)
from workers.contract.schema import ROW_SCHEMA
from workers.engine import replay
from workers.engine.compile_cache import use_compile_cache
from workers.engine.core import Engine
from workers.engine.exactness import inexact_reason
from workers.engine.layout import with_answers
from workers.faults import Fault
from workers.presses import kvzip
from workers.progress import ChunkReporter
from workers.studies.head_stats import DocumentHeadStats, HeadStatsProbe
from workers.studies.qfilters import QueryMoments, QueryMomentsProbe

# The preflight's document: a few chunks past a small window, so every press scores, decides
# and evicts at least once, at the cost of a handful of tiny forwards per config.
PREFLIGHT_DOC_ID = "kvorch-preflight"
PREFLIGHT_TOKENS = 16
PREFLIGHT_CHUNK = 4
PREFLIGHT_WINDOW = 4


class EvalWorker:
    def __init__(self, name: str, settings: WorkerSettings, load: bool = True) -> None:
        """``load=False`` defers the model to the first call that needs it (``load``), so a
        Ray actor answers ``placed`` as soon as its process is up: the driver's placement
        timeout then never counts the minutes a large model takes to load."""
        torch.set_num_threads(max(1, settings.threads))
        if settings.engine.compile:
            use_compile_cache(settings.compile_cache)
        self.name = name
        self.settings = settings
        self.fault = Fault.from_env()
        self.metrics = _Metrics(name) if ray.is_initialized() else None
        self._preflight_engine: Engine | None = None
        self.tokenizer: Any = None
        self._loaded = False
        if load:
            self.load()

    def load(self) -> None:
        """Load the model and build the engine, once."""
        if self._loaded:
            return
        self.model = load_model(self.settings.model, self.settings.dtype, self.settings.device)
        # Taken before the engine hooks the model: the preflight builds its own engine on it.
        self._preflight_model = _sharing_weights(self.model)
        self.engine = Engine(self.model, self.settings.engine, worker=self.name)
        self._loaded = True

    def placed(self) -> str:
        """The Ray node this actor runs on; it needs no model, so it answers once Ray has
        placed the actor (or placed it again after a restart)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else platform.node()

    def describe(self) -> dict:
        """Where this worker runs: recorded in the run spec. Loads the model first."""
        self.load()
        device = self.engine.device
        return {
            "worker": self.name,
            "host": platform.node(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "model_type": getattr(self.model.config, "model_type", None) or type(self.model).__name__,
        }

    def run(self, task: Task, counter: Any = None) -> TaskResult:
        """All rows of ``task``; nothing is written here, so a dying attempt leaves no trace.

        A config that raises on a document costs only its own rows of that document: the
        document is evaluated again config by config (only then, so a healthy batch pays
        nothing), and the configs that still raise come back as :class:`ConfigFailure`.

        ``counter``: the sweep's progress counter (orchestrator/pool/progress.py), told this
        attempt's token-configs as chunks finish, in batches and without waiting
        (workers/progress.py); None (calibration, tests) counts nothing.
        """
        self.load()
        tic = time.perf_counter()
        compiled_before = self.engine.compile_seconds
        chunks = 0
        reporter = ChunkReporter(counter, task.task_id, on_flush=self.metrics.tokens_done if self.metrics else None)
        if counter is not None:  # the driver's line says what this worker compiles, and for how long
            self.engine.on_compile = lambda what, seconds: counter.compiling.remote(self.name, what, seconds)

        def on_chunk(token_configs: int) -> None:
            nonlocal chunks
            chunks += 1
            reporter.add(token_configs)
            if self.fault:
                self.fault.maybe_fire(task.task_id, chunks)

        if self.fault:
            self.fault.maybe_fire(task.task_id, 0)
        tables: list[pa.Table] = []
        failures: list[ConfigFailure] = []
        for doc in task.documents:
            rows, failed = self._evaluate(doc, list(task.configs), on_chunk)
            if self.metrics:
                self.metrics.document(rows)
            tables.append(rows)
            failures.extend(failed)
        reporter.flush()
        if self.metrics:
            self.metrics.task(task.cost, time.perf_counter() - tic)
        return TaskResult(
            pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table(),
            tuple(failures),
            compile_seconds=self.engine.compile_seconds - compiled_before,
            worker=self.name,
        )

    def _evaluate(
        self, doc: TaskDocument, configs: list[EvalConfig], on_chunk: Callable[[int], None]
    ) -> tuple[pa.Table, list[ConfigFailure]]:
        """The document under every config of the batch, or, if the batch raises, under each
        config alone: the rows of those that succeed and one failure per config that raises.
        ``on_chunk`` gets each chunk's token-configs (its tokens times the configs evaluated)."""
        token_ids = torch.tensor(doc.token_ids)

        def rows_of(batch: list[EvalConfig]) -> pa.Table:
            if doc.is_question:
                return self._answer(doc, token_ids, batch, on_chunk)
            return self.engine.evaluate(
                doc.doc_id, token_ids, batch, lambda tokens: on_chunk(tokens * len(batch)), doc.answer
            )

        try:
            return rows_of(configs), []
        except Exception as exc:  # a press may raise anything: it is reported per config below
            if len(configs) == 1:
                return ROW_SCHEMA.empty_table(), [ConfigFailure(doc.doc_id, configs[0].label, error_line(exc))]
        tables, failures = [], []
        for config in configs:
            try:
                tables.append(rows_of([config]))
            except Exception as exc:
                failures.append(ConfigFailure(doc.doc_id, config.label, error_line(exc)))
        return (pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()), failures

    def _answer(
        self, doc: TaskDocument, token_ids: torch.Tensor, configs: list[EvalConfig], on_chunk: Callable[[int], None]
    ) -> pa.Table:
        """A question task: the prompt's rows, and on each config's last one its greedy answer,
        decoded and scored (workers/contract/scorers.py). Progress counts the prompt and the
        generated tokens, times the configs."""
        split = len(doc.token_ids) - doc.question_tokens
        settings = self.settings.generation
        tokenizer = self._tokenizer()

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        stop_ids = self._stop_token_ids() + stopping.single_token_stops(
            settings.stop, lambda text: tokenizer.encode(text, add_special_tokens=False), decode
        )
        if any(c.press.replays_context for c in configs):  # KVzip: bound to this context's replay
            compressed = token_ids if settings.query_aware else token_ids[:split]
            prompt = torch.tensor(kvzip.repeat_prompt_ids(tokenizer))
            configs = replay.bind_replays(self.engine.hooked, configs, compressed, prompt)
        rows, answers = self.engine.generate(
            doc.doc_id, token_ids[:split], token_ids[split:], configs, settings, stop_ids
        )
        on_chunk((len(doc.token_ids) + settings.max_new_tokens) * len(configs))
        columns = {}
        for answer in answers:
            cut = stopping.cut_at_stop(answer.token_ids, decode, settings.stop)
            if cut is None:
                text = decode(answer.token_ids)
            else:
                answer, text = answer.cut(cut[0], "stop"), cut[1]
            columns[answer.config.label] = {
                "generated": text,
                "n_generated": len(answer.token_ids),
                "stop_reason": answer.stop_reason,
                "answer_score": scorers.score(doc.metric, text, list(doc.answers)),
                "generated_density": answer.density,
            }
        return with_answers(rows, columns)

    def _tokenizer(self) -> Any:
        """The model's tokenizer, loaded on the first question (a sweep of corpus text needs none)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.settings.model)
        return self.tokenizer

    def _stop_token_ids(self) -> list[int]:
        """Generation stops at the model's end-of-sequence tokens (its config's, and the tokenizer's)."""
        ids = getattr(self.model.config, "eos_token_id", None)
        found = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
        eos = self._tokenizer().eos_token_id
        return sorted(found | ({eos} if eos is not None else set()))

    def preflight(self, configs: list[EvalConfig]) -> list[tuple[str, str]]:
        """(label, reason) of every config that cannot run on this model, each tried alone on a
        tiny document, so a press that cannot work here stops the job at submit time instead of
        failing on every document of the sweep. Label ``MODEL_LEVEL``: kvorch's baseline does not
        reproduce the model's own forward (workers/engine/exactness.py), whatever the configs.

        The run's attention and cache settings with a small chunk and window, so each press
        scores, decides and evicts within a few forwards, on the engine the sweep will use (the
        chunk step when compiling) but uncompiled: the same code, without a compile per press.
        Its engine runs on the module copy taken before the sweep's engine hooked
        the model, so neither engine's hooks ever see the other's forwards.
        """
        self.load()
        if self._preflight_engine is None:
            engine = self.settings.engine
            settings = dataclasses.replace(
                engine, chunk_size=PREFLIGHT_CHUNK, window=PREFLIGHT_WINDOW, compile=False, static=engine.static_shapes
            )
            self._preflight_engine = Engine(self._preflight_model, settings, worker=self.name)
        generator = torch.Generator().manual_seed(0)
        token_ids = torch.randint(0, self.model.config.vocab_size, (PREFLIGHT_TOKENS,), generator=generator)
        failed = []
        reason = inexact_reason(self._preflight_engine, token_ids)
        if reason is not None:
            failed.append((MODEL_LEVEL, reason))
        for config in configs:
            try:
                # A press that replays the context runs on a replay of the tiny document itself.
                [config] = replay.bind_replays(self._preflight_engine.hooked, [config], token_ids, token_ids[:0])
                self._preflight_engine.evaluate(PREFLIGHT_DOC_ID, token_ids, [config])
            except Exception as exc:  # every reason goes back to the user
                failed.append((config.label, error_line(exc)))
        return failed

    def scores(self, doc: TaskDocument, configs: list[EvalConfig]) -> DocumentScores:
        """Every key's last score and final keep decision under each config, for ``kvorch scores``."""
        self.load()
        return self.engine.inspect(doc.doc_id, torch.tensor(doc.token_ids), configs)[1]

    def query_moments(self, doc: TaskDocument) -> QueryMoments:
        """The post-RoPE queries' moments of one document, for ``kvorch heads qfilters``."""
        self.load()
        return self.engine.observe(doc.doc_id, torch.tensor(doc.token_ids), QueryMomentsProbe()).cpu()

    def head_statistics(self, doc: TaskDocument, probe: HeadStatsProbe) -> DocumentHeadStats:
        """Attention statistics per (chunk, layer, head) of one document, for ``kvorch heads analyze``."""
        self.load()
        return self.engine.observe(doc.doc_id, torch.tensor(doc.token_ids), probe).units(doc.doc_id)


def _sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that holds the very same parameter and buffer tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class _Metrics:
    """Custom Ray metrics of one actor: token-configs evaluated, chunks per method, tokens/s."""

    def __init__(self, worker: str) -> None:
        tags = {"worker": worker}
        self.tokens = metrics.Counter(
            "kvorch_tokens_evaluated",
            "Token-configs evaluated (tokens x configs), counted per chunk and sent in batches.",
            tag_keys=("worker",),
        )
        self.chunks = metrics.Counter(
            "kvorch_chunks_evaluated", "Chunk rows written, per method.", tag_keys=("worker", "method")
        )
        self.rate = metrics.Gauge(
            "kvorch_actor_tokens_per_second", "Token-configs per second of the last task.", tag_keys=("worker",)
        )
        for metric in (self.tokens, self.chunks, self.rate):
            metric.set_default_tags(tags)

    def tokens_done(self, token_configs: int) -> None:
        """A batch of chunks' token-configs, as the progress counter is told them."""
        if token_configs > 0:  # Ray's counters refuse 0
            self.tokens.inc(token_configs)

    def document(self, rows: pa.Table) -> None:
        for method, n in Counter(rows.column("method").to_pylist()).items():
            self.chunks.inc(n, tags={"method": method})

    def task(self, token_configs: int, seconds: float) -> None:
        self.rate.set(token_configs / max(seconds, 1e-9))
