"""A stand-in for EvalWorker in pool tests: no model, no torch, so an actor starts in a second.

A task sleeps; ``die_once`` makes the first task to run kill its actor's process (as an OOM kill
or a lost node would), and Ray's restart of that actor never finishes starting, as on a cluster
with no room left for it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray


@dataclass(frozen=True)
class Behaviour:
    task_seconds: float = 0.5
    die_once: str | None = None  # a marker path; see the module docstring
    load_error: str | None = None  # describe() (where EvalWorker loads its model) raises this
    start_seconds: float = 0.0  # a slow actor start (a busy machine): placed() answers this much later


@dataclass(frozen=True)
class FakeTask:
    task_id: str


@dataclass(frozen=True)
class FakeResult:
    """What the pool reads of a TaskResult: no rows, no failures, a compile of 0.25 s."""

    rows: None = None
    failures: tuple = ()
    compile_seconds: float = 0.25
    worker: str = ""


class FakeWorker:
    def __init__(self, name: str, behaviour: Behaviour, load: bool = True) -> None:
        if behaviour.die_once and ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(3600)  # a restart: never ready
        time.sleep(behaviour.start_seconds)
        self.name = name
        self.behaviour = behaviour

    def placed(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def describe(self) -> dict:
        if self.behaviour.load_error:
            raise OSError(self.behaviour.load_error)
        return {"worker": self.name, "host": "fake", "device": "cpu", "device_name": "fake", "model_type": "fake"}

    def run(self, task: FakeTask) -> FakeResult:
        if self.behaviour.die_once:
            try:
                Path(self.behaviour.die_once).touch(exist_ok=False)
                os._exit(1)
            except FileExistsError:
                pass
        time.sleep(self.behaviour.task_seconds)
        return FakeResult(worker=self.name)
