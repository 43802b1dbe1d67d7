"""The Ray side of a job: a pool of named worker actors pulling tasks, longest first.

The driver keeps one task in flight per actor and hands the next pending task to whichever
actor finishes first, so a slow document never idles the rest of the pool. Rows come back as
Arrow tables through the object store and are written to the lake as each task completes.
The same actors first run the preflight (every config alone on a tiny document, on the first
actor that is ready) and the calibration, so each actor loads the model once per job.

Faults: a config that raises on a document costs only its own rows of that document; the actor
reports it with the task's rows (``TaskResult.failures``) and the task succeeds. An actor that
dies (OOM, preemption, a killed process) is restarted by Ray under the same name and handle
(``max_restarts``) and gets work again once a health check says it is back; its task goes back
to the front of the queue for the next live actor. A task that raises is retried too. A task
that fails more than ``max_retries`` times is recorded as failed and the rest of the job goes
on. Workers never write to the lake, so a dead attempt leaves nothing behind, and a re-run
task's part replaces, never duplicates, its rows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from orchestrator import incomplete
from orchestrator.cluster_connect import DEFAULT_CONNECT_TIMEOUT, join_cluster
from orchestrator.errors import KvorchError
from workers.actor import MODEL_LEVEL, EvalWorker, Task, TaskResult, WorkerSettings
from workers.configs import EvalConfig
from workers.faults import forwarded_env

DEFAULT_MAX_RETRIES = 3


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
    # Configs that raised on a document of a task that succeeded (orchestrator/incomplete.py records).
    config_failures: list[dict] = field(default_factory=list)
    retries: int = 0
    workers: list[dict] = field(default_factory=list)


def start_ray(address: str | None, namespace: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> bool:
    """Join ``address`` (a cluster, within ``connect_timeout`` s) or start an embedded local Ray;
    returns whether it started one.

    The embedded Ray starts its dashboard on 127.0.0.1 when ``ray[default]`` is installed and
    prints its URL. Already initialized (tests, notebooks): nothing to do.
    """
    if ray.is_initialized():
        return False
    if address:
        join_cluster(address, namespace, connect_timeout)
        return False
    # address="local": a new Ray of our own, never a cluster someone `ray start`-ed on this host.
    context = ray.init(
        address="local", namespace=namespace, log_to_driver=False, num_cpus=os.cpu_count(), dashboard_host="127.0.0.1"
    )
    if context.dashboard_url:
        print(f"kvorch: Ray dashboard at http://{context.dashboard_url}", file=sys.stderr)
    return True


def plan_pool(actors: int | None, device: str, gpus_per_actor: float | None = None) -> PoolPlan:
    """One actor per GPU (or one CPU actor sharing a node's cores) unless told otherwise.

    ``gpus_per_actor`` (fractions allowed) packs several actors onto one GPU. CPU actors never
    ask for more cores than the largest node has, or Ray could never place them.
    """
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpu:
        # No GPU visible yet (an autoscaling cluster at zero workers): ask for whole GPUs, and
        # the pending actors make the autoscaler start GPU nodes.
        if gpus_per_actor:
            n = actors or max(1, int(gpus / gpus_per_actor))
            return PoolPlan(n, num_gpus=gpus_per_actor, num_cpus=1, device="cuda")
        n = actors or max(1, int(gpus))
        return PoolPlan(n, num_gpus=min(1.0, gpus / n) if gpus else 1.0, num_cpus=1, device="cuda")
    n = actors or 1
    node_cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return PoolPlan(
        n, num_gpus=0, num_cpus=max(1, min(int(resources.get("CPU", 1)) // n, int(node_cpus))), device="cpu"
    )


def map_on_pool(
    actor_class: type,
    actor_args: Callable[[str], tuple],
    method: str,
    calls: list[tuple[str, tuple, int]],
    pool: PoolPlan,
    label: str,
    hint: str,
) -> list:
    """``actor.method(*args)`` for every ``(name, args, cost)`` of ``calls`` on a pool of named
    actors, costliest first, one call in flight per actor; results in ``calls`` order.

    For the analysis jobs (head statistics, KVzap targets) whose results are small and go back
    to the driver: a failure stops the job with a one-line error naming the item and ``hint``.
    """
    remote = ray.remote(actor_class)
    actors = [
        remote.options(name=f"kvorch-{label}-{i}", num_gpus=pool.num_gpus, num_cpus=pool.num_cpus).remote(
            *actor_args(f"kvorch-{label}-{i}")
        )
        for i in range(pool.n_actors)
    ]
    order = sorted(range(len(calls)), key=lambda i: -calls[i][2])
    results: dict[int, object] = {}
    in_flight: dict[ray.ObjectRef, tuple[ray.actor.ActorHandle, int]] = {}
    idle = list(actors)
    bar = tqdm(total=len(calls), unit="doc", desc=label, file=sys.stderr)
    try:
        while order or in_flight:
            while idle and order:
                actor, index = idle.pop(0), order.pop(0)
                name, args, _ = calls[index]
                ref = getattr(actor, method).options(name=f"kvorch-{label}-{name}").remote(*args)
                in_flight[ref] = (actor, index)
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            actor, index = in_flight.pop(done)
            try:
                results[index] = ray.get(done)
            except (RayActorError, RayTaskError) as exc:
                raise KvorchError(f"{label} failed on {calls[index][0]}: {str(exc).splitlines()[-1]}; {hint}") from None
            idle.append(actor)
            bar.update(1)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return [results[i] for i in range(len(calls))]


class WorkerPool:
    """The job's named actors (``kvorch-worker-<i>``): started once, they run the preflight, the
    calibration and the sweep, each loading the model once. A context manager: leaving it
    kills them.
    """

    def __init__(self, settings: WorkerSettings, plan: PoolPlan) -> None:
        remote_worker = ray.remote(EvalWorker)
        env = forwarded_env()

        def start_actor(i: int) -> ray.actor.ActorHandle:
            name = f"kvorch-worker-{i}"
            # Ray restarts a dead actor; the driver, not Ray, re-runs its task (max_task_retries=0),
            # so every attempt is counted against --max-retries and recorded.
            options = {"name": name, "num_gpus": plan.num_gpus, "num_cpus": plan.num_cpus, "max_restarts": -1}
            if env:
                options["runtime_env"] = {"env_vars": env}
            return remote_worker.options(**options).remote(name, settings)

        self.actors = [start_actor(i) for i in range(plan.n_actors)]
        # Each actor's description, ready once it has loaded the model.
        self._described = [actor.describe.remote() for actor in self.actors]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def describe(self) -> list[dict]:
        """Every actor's description (waits until all have loaded the model)."""
        return [self._started(ref) for ref in self._described]

    def first_ready(self) -> tuple[ray.actor.ActorHandle, dict]:
        """The first actor to have loaded the model, and its description."""
        [ref], _ = ray.wait(list(self._described), num_returns=1)
        return self.actors[self._described.index(ref)], self._started(ref)

    def preflight(self, configs: list[EvalConfig]) -> None:
        """Stop the job, before anything is written, if a config cannot run on the model: each
        config alone on a tiny document, on the first actor that is ready."""
        actor, description = self.first_ready()
        try:
            failed = ray.get(actor.preflight.options(name="kvorch-preflight").remote(configs))
        except RayActorError as exc:
            raise KvorchError(f"the preflight worker died: {_first_line(exc)}; check --model/--device") from None
        if failed:
            model_type = description["model_type"]
            raise KvorchError(
                "\n".join(
                    f"--methods: {label} cannot run on {model_type} models: {reason}"
                    if label != MODEL_LEVEL
                    else f"--model: kvorch cannot evaluate {model_type} models exactly: {reason}"
                    for label, reason in failed
                )
            )

    @staticmethod
    def _started(ref: ray.ObjectRef) -> dict:
        try:
            return ray.get(ref)
        except RayActorError as exc:
            raise KvorchError(
                f"a worker failed to start: {str(exc).splitlines()[-1]}; check --model/--device"
            ) from None


def run_pool(
    tasks: list[Task],
    workers: WorkerPool,
    result: PoolResult,
    on_rows: Callable[[Task, pa.Table], int],
    on_progress: Callable[[Task, bool, PoolResult], None],
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> None:
    """Run every task on the pool; failures are retried, then recorded per task, never dropped.

    ``result`` is filled as tasks finish, so an interrupted pool still tells what it finished.
    """
    actors = workers.actors
    pending = list(tasks)  # already longest first
    attempts: dict[str, int] = {}
    # A ref maps to (actor, its task), or (actor, None) for a restarted actor's health check.
    in_flight: dict[ray.ObjectRef, tuple[int, Task | None]] = {}
    idle = list(range(len(actors)))
    result.workers = workers.describe()
    while pending or in_flight:
        while idle and pending:
            i, task = idle.pop(0), pending.pop(0)
            ref = actors[i].run.options(name=f"kvorch-task-{task.task_id}").remote(task)
            in_flight[ref] = (i, task)
        if not in_flight:
            break  # every actor is gone for good
        [done], _ = ray.wait(list(in_flight), num_returns=1)
        i, task = in_flight.pop(done)
        try:
            out: TaskResult = ray.get(done)
        except (RayActorError, RayTaskError) as exc:
            if task is None:
                continue  # the actor could not be restarted: it leaves the pool
            if isinstance(exc, RayActorError):
                reason = f"worker kvorch-worker-{i} died: {_first_line(exc)}"
                # Back in the pool once Ray has restarted it: the check waits for that.
                in_flight[actors[i].describe.options(max_task_retries=-1).remote()] = (i, None)
            else:
                reason = _first_line(exc.cause or exc)
                idle.append(i)
            attempts[task.task_id] = attempts.get(task.task_id, 0) + 1
            if attempts[task.task_id] > max_retries:
                result.failures[task.task_id] = f"{reason} (after {attempts[task.task_id]} attempts)"
            else:
                result.retries += 1
                pending.insert(0, task)
            on_progress(task, False, result)
            continue
        idle.append(i)
        if task is None:
            continue  # a restarted actor is back
        result.rows_written += on_rows(task, out.rows)
        result.config_failures.extend(incomplete.record(task.task_id, f) for f in out.failures)
        result.tasks_done.append(task.task_id)
        on_progress(task, True, result)
    for task in pending:
        result.failures[task.task_id] = "no live worker left to run it"


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
