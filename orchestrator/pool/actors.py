"""The Ray side of a job: a pool of named worker actors pulling tasks, longest first.

The driver keeps one task in flight per actor and hands the next pending task to whichever
actor finishes first, so a slow document never idles the rest of the pool. Rows come back as
Arrow tables through the object store and are written to the lake as each task completes.
The same actors first run the preflight (every config alone on a tiny document, on the first
actor that is ready) and the calibration, so each actor loads the model once per job.

No step waits for every actor: each takes tasks as soon as it has loaded the model, and an
actor Ray cannot place within ``--actor-timeout`` is given up (a cluster short of room runs on
what it has).

Faults: a config that raises on a document costs only its own rows of that document; the actor
reports it with the task's rows (``TaskResult.failures``) and the task succeeds. An actor that
dies (OOM, preemption, a killed process, a lost node) is restarted by Ray under the same name
and handle (``max_restarts``) and gets work again once it is placed and has loaded the model;
its task goes back to the front of the queue for the next live actor. A lost actor that Ray
cannot place again within ``--actor-timeout`` leaves the pool. The pool ends as soon as every
task is recorded: a restart still in progress never keeps it waiting. A task that raises is
retried too. A task that fails more than ``max_retries`` times is recorded as failed and the
rest of the job goes on. Workers never write to the lake, so a dead attempt leaves nothing
behind, and a re-run task's part replaces, never duplicates, its rows. Every fault event is
told in kvorch's words (orchestrator/pool/events.py).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import pyarrow as pa
import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from tqdm import tqdm

from orchestrator.errors import KvorchError, first_line
from orchestrator.lake import incomplete
from orchestrator.pool import DEFAULT_ACTOR_TIMEOUT, DEFAULT_MAX_RETRIES
from orchestrator.pool import events as pool_events
from orchestrator.pool.connect import DEFAULT_CONNECT_TIMEOUT, join_cluster
from orchestrator.pool.events import EventLog
from workers.contract.configs import EvalConfig
from workers.contract.plan import MODEL_LEVEL, Task, TaskResult
from workers.faults import forwarded_env

# A call to a restarting actor fails at once: a lost worker's restart is checked this often.
RESTART_POLL_SECONDS = 1.0
PLACING, LOADING, IDLE, BUSY, GONE = "placing", "loading", "idle", "busy", "gone"


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
    # Configs that raised on a document of a task that succeeded (orchestrator/lake/incomplete.py records).
    config_failures: list[dict] = field(default_factory=list)
    retries: int = 0
    # Each worker as it described itself, plus "compile_seconds": what its tasks spent compiling.
    workers: list[dict] = field(default_factory=list)
    compile_seconds: dict[str, float] = field(default_factory=dict)
    # Fault events in order (orchestrator/pool/events.py): {"time", "kind", "detail"}.
    events: list[dict] = field(default_factory=list)


def start_ray(address: str | None, namespace: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> bool:
    """Join ``address`` (a cluster, within ``connect_timeout`` s) or start an embedded local Ray;
    returns whether it started one.

    The embedded Ray starts its dashboard on 127.0.0.1 when ``ray[default]`` is installed and
    prints its URL. Already initialized (tests, notebooks): nothing to do.

    Ray's own start-up lines (:data:`RAY_STARTUP_LINES`) are dropped and said once in kvorch's
    dashboard line: Ray 2.60 turns token authentication on for every new local cluster and
    warns so on each start ("Token authentication is enabled for this Ray cluster"); kvorch
    leaves it on (it guards the dashboard and the cluster's ports against other users of the
    machine) and names ``ray get-auth-token``, which prints the token the dashboard asks for.
    """
    if ray.is_initialized():
        return False
    if address:
        join_cluster(address, namespace, connect_timeout)
        return False
    quiet_ray_startup()
    # address="local": a new Ray of our own, never a cluster someone `ray start`-ed on this host.
    context = ray.init(
        address="local", namespace=namespace, log_to_driver=False, num_cpus=os.cpu_count(), dashboard_host="127.0.0.1"
    )
    if context.dashboard_url:
        auth = (
            " (token authentication on, Ray's default: `ray get-auth-token` prints the token the page asks for; "
            "RAY_AUTH_MODE=disabled turns it off)"
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token"  # what Ray sets when it turns it on
            else ""
        )
        print(f"kvorch: Ray dashboard at http://{context.dashboard_url}{auth}", file=sys.stderr)
    return True


# Ray's start-up lines that kvorch's own dashboard line replaces: logger -> how the line starts.
RAY_STARTUP_LINES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    "ray._private.worker": "Started a local Ray instance",
}


class _DropLine(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_startup() -> None:
    """Drop :data:`RAY_STARTUP_LINES` from Ray's loggers (once per process; every other line stays)."""
    for name, prefix in RAY_STARTUP_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLine) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropLine(prefix))


def plan_pool(
    actors: int | None, device: str, gpus_per_actor: float | None = None, fixed_cluster: bool = False
) -> PoolPlan:
    """One actor per GPU (or one CPU actor sharing a node's cores) unless told otherwise.

    ``gpus_per_actor`` (fractions allowed) packs several actors onto one GPU. CPU actors never
    ask for more cores than the largest node has, or Ray could never place them. On a cluster
    that cannot grow (``fixed_cluster``: the embedded local Ray), more CPU actors than it has
    cores (each needs one) are refused before any actor starts, rather than announced and then
    placed only as far as the cores go; a cluster may get nodes, so there the pool starts on
    the actors that fit and :func:`fitting` says how many.
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
    cpus = int(resources.get("CPU", 1))
    if fixed_cluster and n > max(cpus, 1):
        raise KvorchError(
            f"--actors {n} asks for {n} CPU actors, but the cluster has {cpus} CPU(s), one per actor at least; "
            f"pass --actors {max(cpus, 1)} or fewer, or --address a cluster with more"
        )
    node_cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return PoolPlan(
        n, num_gpus=0, num_cpus=max(1, min(int(resources.get("CPU", 1)) // n, int(node_cpus))), device="cpu"
    )


def fitting(plan: PoolPlan) -> str:
    """"" when the cluster has room for every actor of ``plan`` now, else a note saying how
    many fit (the others start if nodes join within ``--actor-timeout``)."""
    resources = ray.cluster_resources()
    if plan.device == "cuda":
        room = resources.get("GPU", 0.0) / plan.num_gpus if plan.num_gpus else plan.n_actors
    else:
        room = resources.get("CPU", 0.0) / plan.num_cpus
    fit = int(room + 1e-9)
    if fit >= plan.n_actors:
        return ""
    return f" ({fit} fit the cluster now; the others start if nodes join within --actor-timeout)"


@dataclass(frozen=True)
class Call:
    """One call the pool makes: ``method(*args)`` on whichever actor is free. ``key`` names it
    in Ray (``kvorch-<label>-<key>``, as the dashboard lists it) and in messages."""

    key: str
    method: str
    args: tuple


def map_on_pool(
    worker_class: type,
    worker_args: tuple,
    method: str,
    calls: list[tuple[str, tuple, int]],
    plan: PoolPlan,
    label: str,
    hint: str,
    actor_timeout: float = DEFAULT_ACTOR_TIMEOUT,
) -> list:
    """``method(*args)`` for every ``(key, args, cost)`` of ``calls`` on a pool of named actors of
    ``worker_class(name, *worker_args)``, costliest first; results in ``calls`` order.

    For the analysis jobs (head statistics, KVzap targets), whose results are small and go back
    to the driver. They run on the same pool loop as the sweep (:func:`run_calls`): an actor is
    used as soon as it is ready, a lost one's call is re-queued; a call that raises stops the job
    with a one-line error naming the item and ``hint``.
    """
    order = sorted(calls, key=lambda c: -c[2])
    with WorkerPool(plan, worker_class, worker_args, actor_timeout, label=label) as pool:
        bar = tqdm(total=len(calls), unit="doc", desc=label, file=sys.stderr)
        try:
            results = pool.map([Call(key, method, args) for key, args, _ in order], hint, bar.update)
        finally:
            bar.close()
    by_key = dict(zip((key for key, _, _ in order), results, strict=True))
    return [by_key[key] for key, _, _ in calls]


@dataclass(eq=False)
class Worker:
    """One actor of the pool and where it stands.

    ``placing``: Ray has not started it yet, or not again after a loss, and it has until
    ``deadline``; ``loading``: it is up and loads the model; ``idle`` and ``busy`` (a task in
    flight): it works; ``gone``: given up, or dead for good.
    """

    name: str
    actor: ray.actor.ActorHandle
    state: str = PLACING
    ref: ray.ObjectRef | None = None  # its readiness call in flight: placed(), then describe()
    deadline: float = math.inf  # monotonic time by which Ray must have placed it
    retry_at: float | None = None  # when a lost worker's restart is checked again
    node: str | None = None  # the Ray node it was last placed on
    description: dict | None = None
    losses: int = 0


class WorkerPool:
    """The job's named actors (``kvorch-worker-<i>``): started once, they run the preflight, the
    calibration and the sweep, each loading the model once. A context manager: leaving it
    kills them, so no actor (nor a pending restart) outlives the job.

    Nothing waits for every actor: each one takes work as soon as it has loaded the model. An
    actor Ray cannot place within ``actor_timeout`` seconds (at the start, or again after its
    node was lost) leaves the pool with a notice; the actors load the model only once placed
    (``EvalWorker.placed``), so the timeout never counts the model's loading time.
    """

    def __init__(
        self,
        plan: PoolPlan,
        worker_class: type,
        worker_args: tuple,
        actor_timeout: float = DEFAULT_ACTOR_TIMEOUT,
        label: str = "worker",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Actors ``kvorch-<label>-<i>`` of ``worker_class(name, *worker_args, load=False)``: an
        EvalWorker (the sweep, head statistics), a TargetWorker (KVzap), or a stand-in (tests);
        each has ``placed``, and ``describe`` that loads its model. ``clock`` measures the
        deadlines (tests pass one that leaves out how long a loaded machine takes to start actor
        processes, so a timeout of seconds tests the logic, not the machine's speed)."""
        remote_worker = ray.remote(worker_class)
        env = forwarded_env()
        self.label = label

        def start_actor(name: str) -> ray.actor.ActorHandle:
            # Ray restarts a dead actor; the driver, not Ray, re-runs its call (max_task_retries=0),
            # so every attempt is counted against --max-retries and recorded.
            options = {"name": name, "num_gpus": plan.num_gpus, "num_cpus": plan.num_cpus, "max_restarts": -1}
            if env:
                options["runtime_env"] = {"env_vars": env}
            return remote_worker.options(**options).remote(name, *worker_args, load=False)

        self.plan = plan
        self.actor_timeout = actor_timeout
        self._clock = clock
        self.log = EventLog()
        names = [f"kvorch-{label}-{i}" for i in range(plan.n_actors)]
        self.workers = [Worker(name, start_actor(name)) for name in names]
        self._dead_nodes: set[str] = set()
        deadline = clock() + actor_timeout
        for worker in self.workers:
            worker.deadline = deadline
            worker.ref = worker.actor.placed.remote()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for worker in self.workers:
            ray.kill(worker.actor)

    @property
    def events(self) -> list[dict]:
        return self.log.events

    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.state == IDLE]

    def live(self) -> int:
        """Workers still in the pool, working or on their way."""
        return sum(w.state != GONE for w in self.workers)

    def descriptions(self) -> list[dict]:
        """Every worker that has loaded the model, as it last described itself."""
        return [w.description for w in self.workers if w.description is not None]

    def first_ready(self) -> tuple[ray.actor.ActorHandle, dict]:
        """The first actor to have loaded the model, and its description."""
        while not self.idle():
            if not self.live():
                raise self.none_left()
            self.wait([])
        worker = self.idle()[0]
        return worker.actor, worker.description

    def preflight(self, configs: list[EvalConfig]) -> None:
        """Stop the job, before anything is written, if a config cannot run on the model: each
        config alone on a tiny document, on the first actor that is ready."""
        actor, description = self.first_ready()
        try:
            failed = ray.get(actor.preflight.options(name="kvorch-preflight").remote(configs))
        except RayActorError as exc:
            raise KvorchError(f"the preflight worker died: {first_line(exc)}; check --model/--device") from None
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

    def assign(self, worker: Worker, call: Call) -> ray.ObjectRef:
        worker.state = BUSY
        return (
            getattr(worker.actor, call.method).options(name=f"kvorch-{self.task_label}-{call.key}").remote(*call.args)
        )

    @property
    def task_label(self) -> str:
        """How the pool's calls are named in Ray: ``kvorch-task-<task id>`` for the sweep."""
        return "task" if self.label == "worker" else self.label

    def map(self, calls: list[Call], hint: str, on_each: Callable[[], object] = lambda: None) -> list:
        """Every call's result, in ``calls`` order, spread over the ready actors. A call that
        raises stops with a one-line KvorchError naming it and ``hint``; a lost actor's call is
        re-queued like a sweep task."""
        results: dict[str, object] = {}

        def done(call: Call, out: object) -> None:
            results[call.key] = out
            on_each()

        def failed(call: Call, reason: str, final: bool) -> None:
            if final:
                raise KvorchError(f"{self.label} failed on {call.key}: {reason}; {hint}")

        run_calls(self, calls, done, failed, DEFAULT_MAX_RETRIES, retry_errors=False)
        return [results[call.key] for call in calls]

    def release(self, worker: Worker) -> None:
        worker.state = IDLE

    def wait(self, tasks: list[ray.ObjectRef]) -> ray.ObjectRef | None:
        """Until one of ``tasks`` finishes (returned) or a worker's readiness changes (handled
        here: placed, loaded, given up, checked again; None). Only these workers' own calls
        are waited on: a restart in progress never holds up a finished pool."""
        readiness = {w.ref: w for w in self.workers if w.ref is not None}
        refs = [*tasks, *readiness]
        timeout = self._next_timer()
        if refs:
            done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        elif timeout is not None:
            time.sleep(timeout)
            done = []
        else:
            raise self.none_left()
        finished = done[0] if done else None
        if finished in readiness:
            self._ready(readiness[finished], finished)
            finished = None
        self._on_timers()
        return finished

    def lose(self, worker: Worker, exc: RayActorError) -> None:
        """``worker``'s actor died (its process or its node): Ray restarts it if it can place it,
        and the driver checks for that until ``actor_timeout`` has passed."""
        now = self._clock()
        worker.state, worker.ref, worker.losses = PLACING, None, worker.losses + 1
        worker.deadline, worker.retry_at = now + self.actor_timeout, now + RESTART_POLL_SECONDS
        self.log.pool_size(self._working())
        self.log.record(
            pool_events.ACTOR_LOST,
            f"worker {worker.name} lost ({_actor_error(exc)}); "
            f"waiting up to {self.actor_timeout:g} s for Ray to restart it",
        )
        self._check_node(worker)

    def none_left(self, unrun: int | None = None) -> KvorchError:
        """The error when no worker is left to run the remaining tasks."""
        tail = f"; {unrun} task(s) not run, run the same command again to resume" if unrun else ""
        if not self.descriptions():
            return KvorchError(
                f"no worker could be placed within --actor-timeout {self.actor_timeout:g} s (each asks Ray for "
                f"{self.plan.num_cpus:g} CPU, {self.plan.num_gpus:g} GPU); free room on the cluster, or pass a "
                f"longer --actor-timeout when it autoscales{tail}"
            )
        return KvorchError(
            f"every worker was lost and none could be placed again within --actor-timeout "
            f"{self.actor_timeout:g} s{tail}"
        )

    def _working(self) -> int:
        return sum(w.state in (IDLE, BUSY) for w in self.workers)

    def _ready(self, worker: Worker, ref: ray.ObjectRef) -> None:
        """``worker``'s readiness call returned: placed (then it loads the model), or loaded."""
        worker.ref = None
        try:
            answer = ray.get(ref)
        except RayTaskError as exc:
            raise _failed_to_start(exc) from None
        except RayActorError as exc:
            if worker.state == LOADING:
                self.lose(worker, exc)  # died while loading the model: placed again, or given up
            elif isinstance(exc, ActorUnavailableError):
                worker.retry_at = self._clock() + RESTART_POLL_SECONDS  # still restarting: ask again soon
            elif worker.losses:
                self._drop(worker, pool_events.POOL_SHRUNK, f"died for good ({_actor_error(exc)})")
            else:
                raise _failed_to_start(exc) from None
            return
        if worker.state == PLACING:
            worker.state, worker.node = LOADING, answer
            worker.ref = worker.actor.describe.remote()
            if worker.losses:
                self.log.record(
                    pool_events.ACTOR_RESTARTED,
                    f"worker {worker.name} restarted on node {answer[:8]}; loading the model",
                )
            return
        worker.state, worker.description = IDLE, answer
        self.log.pool_size(self._working())

    def _next_timer(self) -> float | None:
        """Seconds until the next placement deadline or restart check, None when there is none."""
        times = [w.deadline for w in self.workers if w.state == PLACING]
        times += [w.retry_at for w in self.workers if w.state == PLACING and w.ref is None and w.retry_at is not None]
        return max(0.0, min(times) - self._clock()) if times else None

    def _on_timers(self) -> None:
        """Give up workers past their deadline; check lost ones for a restart again."""
        now = self._clock()
        for worker in self.workers:
            if worker.state != PLACING:
                continue
            if now >= worker.deadline:
                how = "placed again" if worker.losses else "placed"
                kind = pool_events.POOL_SHRUNK if worker.losses else pool_events.ACTOR_GIVEN_UP
                self._drop(worker, kind, f"could not be {how} within --actor-timeout {self.actor_timeout:g} s")
            elif worker.ref is None and worker.retry_at is not None and now >= worker.retry_at:
                self._check_node(worker)
                worker.retry_at, worker.ref = None, worker.actor.placed.remote()

    def _drop(self, worker: Worker, kind: str, why: str) -> None:
        """``worker`` leaves the pool for good; its actor is killed, so a restart Ray places later
        does not take resources from anyone."""
        ray.kill(worker.actor)
        worker.state, worker.ref = GONE, None
        self.log.pool_size(self._working())
        self.log.record(kind, f"worker {worker.name} {why}; pool shrunk to {self.live()}")

    def _check_node(self, worker: Worker) -> None:
        """Say so once when the node a lost worker ran on is gone."""
        if worker.node is None or worker.node in self._dead_nodes:
            return
        node = next((n for n in ray.nodes() if n["NodeID"] == worker.node), None)
        if node is None or not node["Alive"]:
            self._dead_nodes.add(worker.node)
            where = f" ({node['NodeManagerAddress']})" if node else ""
            self.log.record(pool_events.NODE_LOST, f"node {worker.node[:8]}{where} lost, with worker {worker.name}")


def run_calls(
    pool: WorkerPool,
    calls: list[Call],
    on_done: Callable[[Call, object], None],
    on_failed: Callable[[Call, str, bool], None],
    max_retries: int,
    retry_errors: bool = True,
    on_abandoned: Callable[[list[Call]], None] = lambda calls: None,
) -> None:
    """The one pool loop, for the sweep, calibration and the analysis jobs: each ready actor
    takes the next call (``calls`` in order), a finished call goes to ``on_done``.

    A failed attempt goes to ``on_failed(call, reason, final)``: a lost actor's call (and, with
    ``retry_errors``, one that raised) goes back to the front of the queue until it has failed
    ``max_retries`` + 1 times, then ``final``. The loop ends as soon as every call is recorded,
    whatever actors are still starting or restarting; a pool left with no worker at all hands
    the calls not run to ``on_abandoned`` and raises a KvorchError.
    """
    pending = list(calls)
    attempts: dict[str, int] = {}  # call key -> its failed attempts
    running: dict[ray.ObjectRef, tuple[Worker, Call]] = {}
    while pending or running:
        for worker in pool.idle()[: len(pending)]:
            call = pending.pop(0)
            running[pool.assign(worker, call)] = (worker, call)
        if not running and not pool.live():
            on_abandoned(pending)
            raise pool.none_left(len(pending))
        done = pool.wait(list(running))
        if done is None:
            continue
        worker, call = running.pop(done)
        out, failure = _collect(pool, worker, done, retry_errors)
        if failure is None:
            on_done(call, out)
            continue
        attempts[call.key] = attempts.get(call.key, 0) + 1
        if not failure.retry or attempts[call.key] > max_retries:
            reason = f"{failure.reason} (after {attempts[call.key]} attempts)" if failure.retry else failure.reason
            on_failed(call, reason, True)
            continue
        pending.insert(0, call)
        pool.log.record(
            pool_events.TASK_REQUEUED,
            f"task {call.key} re-queued (attempt {attempts[call.key] + 1} of {max_retries + 1}): {failure.cause[:160]}",
        )
        on_failed(call, failure.reason, False)


@dataclass(frozen=True)
class _Failure:
    """One failed attempt at a call."""

    reason: str  # what on_failed is told
    cause: str  # what the re-queue event says
    retry: bool  # whether the call may run again


def _collect(
    pool: WorkerPool, worker: Worker, ref: ray.ObjectRef, retry_errors: bool
) -> tuple[object, _Failure | None]:
    """A finished call's result and None, or None and how it failed. Its worker takes the next
    call, unless its actor died: then the pool waits for Ray to restart it (``WorkerPool.lose``),
    and the call may always run again, since it was not its fault."""
    try:
        out = ray.get(ref)
    except RayActorError as exc:
        pool.lose(worker, exc)
        return None, _Failure(
            f"worker {worker.name} died: {first_line(exc)}", f"its worker {worker.name} was lost", retry=True
        )
    except RayTaskError as exc:
        pool.release(worker)
        reason = first_line(exc.cause or exc)
        return None, _Failure(reason, reason, retry=retry_errors)
    pool.release(worker)
    return out, None


def run_pool(
    tasks: list[Task],
    workers: WorkerPool,
    result: PoolResult,
    on_rows: Callable[[Task, pa.Table], int],
    on_progress: Callable[[Task, bool, PoolResult], None],
    max_retries: int = DEFAULT_MAX_RETRIES,
    counter: ray.actor.ActorHandle | None = None,
) -> None:
    """Run every task of the sweep on the pool; failures are retried, then recorded per task,
    never dropped. ``result`` is filled as tasks finish, so an interrupted pool still tells what
    it finished. ``counter``: the sweep's progress counter (orchestrator/pool/progress.py), which
    each worker tells its task's token-configs as chunks finish."""
    by_key = {task.task_id: task for task in tasks}
    result.events = workers.events

    def done(call: Call, out: TaskResult) -> None:
        task = by_key[call.key]
        result.rows_written += on_rows(task, out.rows)
        result.compile_seconds[out.worker] = result.compile_seconds.get(out.worker, 0.0) + out.compile_seconds
        result.config_failures.extend(incomplete.record(task.task_id, f) for f in out.failures)
        result.tasks_done.append(task.task_id)
        on_progress(task, True, result)

    def failed(call: Call, reason: str, final: bool) -> None:
        if final:
            result.failures[call.key] = reason
        else:
            result.retries += 1
        on_progress(by_key[call.key], False, result)

    def abandoned(calls: list[Call]) -> None:
        for call in calls:
            result.failures[call.key] = "no live worker left to run it"

    try:
        extra = () if counter is None else (counter,)
        calls = [Call(task.task_id, "run", (task, *extra)) for task in tasks]  # already longest first
        run_calls(workers, calls, done, failed, max_retries, on_abandoned=abandoned)
    finally:
        result.workers = [
            {**w, "compile_seconds": round(result.compile_seconds.get(w["worker"], 0.0), 3)}
            for w in workers.descriptions()
        ]


def _actor_error(exc: RayActorError) -> str:
    """Ray's first line about a dead actor, without the actor id and the boilerplate."""
    line = re.sub(r"^The actor [0-9a-f]+ ", "the actor ", first_line(exc))
    return line.split(" The task may or may not")[0][:200]


def _failed_to_start(exc: BaseException) -> KvorchError:
    """The error for an actor whose start (or model loading) raised: Ray's last line is the cause."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    cause = lines[-1] if lines else type(exc).__name__
    return KvorchError(f"a worker failed to start: {cause}; check --model/--device")
