"""The body of a kvorch worker actor: loads the model once, then evaluates tasks.

This is a plain class; the driver turns it into a Ray actor (``ray.remote``) with the resources
it needs, so the worker side stays importable and testable without Ray.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import pyarrow as pa
import torch

from workers.configs import EvalConfig
from workers.engine import Engine, EngineSettings
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
        tables = [
            self.engine.evaluate(doc.doc_id, torch.tensor(doc.token_ids), list(task.configs)) for doc in task.documents
        ]
        return pa.concat_tables(tables)
