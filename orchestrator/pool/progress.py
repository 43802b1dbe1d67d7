"""A sweep's chunk-level progress: a small Ray actor that the workers tell, and the driver reads.

Each worker sends its task's running total of token-configs (tokens x configs) here, batched and
without waiting (workers/progress.py: the first chunk at once, then at most every 0.5 s); the
driver tells it which tasks finished (their exact cost) or must start over (a failed attempt),
also without waiting, and reads :meth:`ProgressCounter.snapshot` from a thread
(orchestrator/sweep/progress.py). Nothing on a worker's path and nothing in the driver's pool loop
ever waits on it.

It exports the same counts as Ray metrics, tagged with the driver's namespace:
``kvorch_progress_token_configs`` (done: finished tasks plus what running tasks reported) and
``kvorch_run_token_configs`` (the run's whole cost).
"""

from __future__ import annotations

import time

import ray
from ray.util import metrics


class ProgressCounter:
    """Token-configs per running task (the latest total its attempt reported) and of finished tasks."""

    def __init__(self, namespace: str, total: int, done: int) -> None:
        self.total = total
        self.done = done  # finished tasks' exact costs, resumed ones included
        self.running: dict[str, int] = {}
        self.finished: set[str] = set()
        # Workers compiling a chunk step now: worker -> (what, when it started, epoch seconds).
        self.compiles: dict[str, tuple[str, float]] = {}
        tags = {"namespace": namespace}
        self._done = metrics.Gauge(
            "kvorch_progress_token_configs",
            "Token-configs done: finished tasks plus what running tasks reported, per chunk in batches.",
            tag_keys=("namespace",),
        )
        self._total = metrics.Gauge(
            "kvorch_run_token_configs", "Token-configs of the whole run.", tag_keys=("namespace",)
        )
        for metric in (self._done, self._total):
            metric.set_default_tags(tags)
        self._total.set(total)
        self._export()

    def report(self, task_id: str, token_configs: int) -> None:
        """A worker's running total for its attempt at ``task_id`` (a late one for a finished task is dropped)."""
        if task_id not in self.finished:
            self.running[task_id] = token_configs
            self._export()

    def finish(self, task_id: str, cost: int) -> None:
        """``task_id`` is done: its exact cost replaces what its attempt reported."""
        self.running.pop(task_id, None)
        if task_id not in self.finished:
            self.finished.add(task_id)
            self.done += cost
        self._export()

    def forget(self, task_id: str) -> None:
        """``task_id``'s attempt failed: what it reported no longer counts (a re-run starts at 0)."""
        self.running.pop(task_id, None)
        self._export()

    def compiling(self, worker: str, what: str, seconds: float | None) -> None:
        """``worker`` started compiling ``what`` (``seconds`` None) or finished after ``seconds``."""
        if seconds is None:
            self.compiles[worker] = (what, time.time())
        else:
            self.compiles.pop(worker, None)

    def snapshot(self) -> dict[str, int]:
        """The running tasks' latest totals."""
        return dict(self.running)

    def compiling_now(self) -> dict[str, tuple[str, float]]:
        """Workers compiling now: worker -> (what, started at, epoch seconds)."""
        return dict(self.compiles)

    def exported(self) -> dict[str, int]:
        """The values the two gauges were last set to."""
        return {"done": self.done + sum(self.running.values()), "total": self.total}

    def _export(self) -> None:
        self._done.set(self.exported()["done"])


def start_counter(total: int, done: int) -> ray.actor.ActorHandle:
    """The sweep's counter, on no CPU of its own (it never holds an actor's slot)."""
    namespace = ray.get_runtime_context().namespace
    return ray.remote(ProgressCounter).options(num_cpus=0, name="kvorch-progress").remote(namespace, total, done)
