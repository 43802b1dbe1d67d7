"""The Ray side of a job: a pool of named worker actors pulling tasks, longest first.

The driver keeps one task in flight per actor and hands the next pending task to whichever
actor finishes first, so a slow document never idles the rest of the pool. Rows come back as
Arrow tables through the object store and are written to the lake as each task completes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError

from workers.actor import EvalWorker, Task, WorkerSettings


@dataclass(frozen=True)
class PoolPlan:
    """How many actors, and what each one asks Ray for."""

    n_actors: int
    num_gpus: float
    num_cpus: float
    device: str

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


@dataclass
class PoolResult:
    rows_written: int = 0
    tasks_done: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    workers: list[dict] = field(default_factory=list)


def start_ray(address: str | None, namespace: str) -> None:
    """Join ``address`` (a cluster) or start an embedded local Ray; no-op when already up."""
    if ray.is_initialized():
        return
    # "local" always starts our own instance: address=None would join any Ray another user runs here
    ray.init(
        address=address or "local",
        namespace=namespace,
        log_to_driver=False,
        num_cpus=None if address else os.cpu_count(),
    )


def plan_pool(actors: int | None, device: str) -> PoolPlan:
    """One actor per GPU (or one CPU actor sharing the cores) unless ``actors`` says otherwise."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    use_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    if use_gpu:
        n = actors or max(1, int(gpus))
        return PoolPlan(n, num_gpus=min(1.0, gpus / n), num_cpus=1, device="cuda")
    n = actors or 1
    return PoolPlan(n, num_gpus=0, num_cpus=max(1, int(cpus) // n), device="cpu")


def run_pool(
    tasks: list[Task],
    settings: WorkerSettings,
    pool: PoolPlan,
    on_rows: Callable[[Task, pa.Table], int],
    on_progress: Callable[[Task], None],
) -> PoolResult:
    """Run every task on the pool; failures are recorded per task, never silently dropped."""
    remote_worker = ray.remote(EvalWorker)
    actors = [
        remote_worker.options(name=f"kvorch-worker-{i}", num_gpus=pool.num_gpus, num_cpus=pool.num_cpus).remote(
            f"kvorch-worker-{i}", settings
        )
        for i in range(pool.n_actors)
    ]
    result = PoolResult()
    pending = list(tasks)  # already longest first
    in_flight: dict[ray.ObjectRef, tuple[ray.actor.ActorHandle, Task]] = {}
    idle = list(actors)
    try:
        result.workers = ray.get([a.describe.remote() for a in actors])
        while pending or in_flight:
            while idle and pending:
                actor, task = idle.pop(0), pending.pop(0)
                in_flight[actor.run.options(name=f"kvorch-task-{task.task_id}").remote(task)] = (actor, task)
            if not in_flight:
                break
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            actor, task = in_flight.pop(done)
            try:
                rows = ray.get(done)
            except RayActorError as exc:
                result.failures[task.task_id] = f"worker died: {exc}"
                continue  # the actor is gone: it does not return to the pool
            except RayTaskError as exc:
                result.failures[task.task_id] = str(exc.cause or exc).splitlines()[0]
                idle.append(actor)
                continue
            result.rows_written += on_rows(task, rows)
            result.tasks_done.append(task.task_id)
            on_progress(task)
            idle.append(actor)
        for task in pending:
            result.failures[task.task_id] = "no live worker left to run it"
    finally:
        for actor in actors:
            ray.kill(actor)
    return result
