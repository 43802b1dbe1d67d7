"""The body of a kvorch worker actor: loads the model once, then evaluates tasks.

This is a plain class; the driver turns it into a Ray actor (``ray.remote``) with the resources
it needs, so the worker side stays importable and testable without Ray. Inside Ray it exports
custom metrics (``ray.util.metrics``) that the Ray dashboard and Prometheus pick up.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import ray
import torch
from ray.util import metrics

from workers.configs import EvalConfig
from workers.engine import Engine, EngineSettings
from workers.faults import Fault
from workers.head_stats import DocumentHeadStats, HeadStatsProbe
from workers.models import load_model


@dataclass(frozen=True)
class TaskDocument:
    doc_id: str
    token_ids: list[int]


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
class WorkerSettings:
    model: str
    dtype: str
    device: str
    threads: int
    engine: EngineSettings


class EvalWorker:
    def __init__(self, name: str, settings: WorkerSettings) -> None:
        torch.set_num_threads(max(1, settings.threads))
        self.name = name
        model = load_model(settings.model, settings.dtype, settings.device)
        self.engine = Engine(model, settings.engine, worker=name)
        self.fault = Fault.from_env()
        self.metrics = _Metrics(name) if ray.is_initialized() else None

    def describe(self) -> dict:
        """Where this worker runs: recorded in the run spec."""
        device = self.engine.device
        return {
            "worker": self.name,
            "host": platform.node(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }

    def run(self, task: Task) -> pa.Table:
        """All rows of ``task``; nothing is written here, so a dying attempt leaves no trace."""
        tic = time.perf_counter()
        chunks = 0

        def on_chunk() -> None:
            nonlocal chunks
            chunks += 1
            if self.fault:
                self.fault.maybe_fire(task.task_id, chunks)

        if self.fault:
            self.fault.maybe_fire(task.task_id, 0)
        tables = []
        for doc in task.documents:
            rows = self.engine.evaluate(doc.doc_id, torch.tensor(doc.token_ids), list(task.configs), on_chunk)
            if self.metrics:
                self.metrics.document(len(doc.token_ids) * len(task.configs), rows)
            tables.append(rows)
        if self.metrics:
            self.metrics.task(task.cost, time.perf_counter() - tic)
        return pa.concat_tables(tables)

    def head_statistics(self, doc: TaskDocument, probe: HeadStatsProbe) -> DocumentHeadStats:
        """Attention statistics per (chunk, layer, head) of one document, for ``kvorch heads analyze``."""
        return self.engine.observe(doc.doc_id, torch.tensor(doc.token_ids), probe).units(doc.doc_id)


class _Metrics:
    """Custom Ray metrics of one actor: token-configs evaluated, chunks per method, tokens/s."""

    def __init__(self, worker: str) -> None:
        tags = {"worker": worker}
        self.tokens = metrics.Counter(
            "kvorch_tokens_evaluated", "Token-configs evaluated (tokens x configs).", tag_keys=("worker",)
        )
        self.chunks = metrics.Counter(
            "kvorch_chunks_evaluated", "Chunk rows written, per method.", tag_keys=("worker", "method")
        )
        self.rate = metrics.Gauge(
            "kvorch_actor_tokens_per_second", "Token-configs per second of the last task.", tag_keys=("worker",)
        )
        for metric in (self.tokens, self.chunks, self.rate):
            metric.set_default_tags(tags)

    def document(self, token_configs: int, rows: pa.Table) -> None:
        self.tokens.inc(token_configs)
        for method, n in Counter(rows.column("method").to_pylist()).items():
            self.chunks.inc(n, tags={"method": method})

    def task(self, token_configs: int, seconds: float) -> None:
        self.rate.set(token_configs / max(seconds, 1e-9))
