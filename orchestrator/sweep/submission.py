"""A submission end to end: validate, tokenize, plan, run on Ray, stream rows into the lake.

Everything that can be wrong with the input is checked before the lake is touched, so a bad
submission never leaves anything behind and never alters existing runs; that includes a method
that cannot run on the model, which the preflight (``EvalWorker.preflight``) finds on the pool's
first ready actor. A submission whose spec matches an unfinished run (or ``--resume RUN_ID``)
computes only that run's missing tasks.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import ray

from orchestrator.corpus import model_inputs
from orchestrator.errors import KvorchError
from orchestrator.lake import incomplete, integrity, run_status
from orchestrator.lake.store import Lake, check_run_id
from orchestrator.pool import actors
from orchestrator.pool.connect import DEFAULT_CONNECT_TIMEOUT
from orchestrator.pool.progress import start_counter
from orchestrator.sweep import attempts, batching, calibration, compile_check, documents
from orchestrator.sweep.endings import ending, failed_tasks_line, interrupts_as_exceptions, write_final_status
from orchestrator.sweep.heartbeat import Heartbeat
from orchestrator.sweep.planner import TokenizedDocument, check_lengths, default_shards, plan_tasks
from orchestrator.sweep.progress import Progress
from orchestrator.sweep.resume import choose_run, spec_hash
from orchestrator.sweep.run_lock import RunLock
from orchestrator.sweep.spec import JobSpec
from workers.actor import EvalWorker
from workers.contract.models import resolve_dtype
from workers.contract.plan import Task, WorkerSettings
from workers.contract.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class JobResult:
    run_id: str
    rows_written: int
    tasks: int
    failures: dict[str, str]
    seconds: float
    config_failures: list[dict]  # every incomplete config's failures (orchestrator/lake/incomplete.py)


def submit(
    spec: JobSpec,
    lake: Lake,
    run_id: str | None = None,
    address: str | None = None,
    show_progress: bool = True,
    resume: bool = False,
    max_retries: int = actors.DEFAULT_MAX_RETRIES,
    gpus_per_actor: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    actor_timeout: float = actors.DEFAULT_ACTOR_TIMEOUT,
) -> JobResult:
    """Run ``spec`` into ``lake``: a fresh run, or the missing tasks of an unfinished one.

    ``resume`` means ``run_id`` must already exist. Ctrl-C or SIGTERM (``endings.interrupts_as_exceptions``)
    keeps every finished part, records the run as interrupted, shuts down an embedded Ray and
    re-raises. One driver per run: a run another live driver computes is refused (``RunLock``).
    ``actor_timeout``: seconds Ray has to place an actor before the pool goes on without it.
    """
    tic = time.perf_counter()
    if run_id is not None:
        check_run_id(run_id, "--resume" if resume else "--run-id")
    tokens, corpus = model_inputs(spec.model, spec.corpus, spec.bos)
    docs = documents.run_documents(spec, tokens, corpus)
    check_lengths(docs, spec.chunk_size)
    held_out = calibration.held_out_documents(corpus, spec, tokens) if spec.densities else []
    lake.ensure_writable()
    docs_table = documents.docs_table(docs)
    # The token ids are part of what a run is: a resume under another tokenization would mix rows.
    recorded = tokens.fingerprint(d.token_ids for d in docs)
    spec_json = {**spec.to_json(), "tokenization": recorded}
    fingerprint = spec_hash(spec_json, docs_table)
    target = choose_run(lake, run_id, fingerprint, spec_json, must_exist=resume)
    run_id, previous = target.run_id, target.previous

    with RunLock(lake, run_id):
        started_ray = actors.start_ray(address, f"kvorch-{run_id}", connect_timeout)
        # After Ray starts: its core worker installs a SIGTERM handler of its own, which ours replaces.
        try:
            with interrupts_as_exceptions():
                return _run(
                    spec,
                    lake,
                    run_id,
                    previous,
                    fingerprint,
                    recorded,
                    docs,
                    docs_table,
                    held_out,
                    tic,
                    show_progress=show_progress,
                    max_retries=max_retries,
                    gpus_per_actor=gpus_per_actor,
                    actor_timeout=actor_timeout,
                )
        finally:
            if started_ray:
                ray.shutdown()


def _run(
    spec: JobSpec,
    lake: Lake,
    run_id: str,
    previous: dict | None,
    fingerprint: str,
    recorded_tokenization: dict,
    docs: list[TokenizedDocument],
    docs_table: pa.Table,
    held_out: list[TokenizedDocument],
    tic: float,
    *,
    show_progress: bool,
    max_retries: int,
    gpus_per_actor: float | None,
    actor_timeout: float,
) -> JobResult:
    pool = actors.plan_pool(spec.actors, spec.device, gpus_per_actor)
    dtype = resolve_dtype(spec.dtype, pool.device)
    if previous and previous.get("dtype_resolved") != dtype:
        raise KvorchError(
            f"run {run_id} was computed in {previous.get('dtype_resolved')}, this pool would use {dtype}; "
            f"pass --dtype {previous.get('dtype_resolved')} to resume it"
        )
    engine = compile_check.resolve_compile(spec.engine_for(pool.device), spec.compile, pool.device)
    note = compile_check.eager_note(engine, list(spec.configs))
    if note:
        print(f"kvorch: {note}", file=sys.stderr)
    settings = WorkerSettings(spec.model, dtype, pool.device, pool.threads, engine, spec.compile_cache)
    n_shards = previous["n_shards"] if previous else default_shards(pool.n_actors)
    if previous:
        batch_configs = previous["batch_configs_resolved"]
    else:
        longest = max(len(d.token_ids) for d in [*docs, *held_out])
        batch_configs = batching.resolve(spec, pool, dtype, engine, longest)
    with actors.WorkerPool(pool, EvalWorker, (settings,), actor_timeout) as workers:
        # Still nothing written: a config that cannot run on this model stops the job here.
        workers.preflight(list(spec.configs))
        # Calibration is deterministic for a given spec, documents and dtype: a resumed run redoes
        # it and gets the thresholds, hence the tasks, of its first attempt.
        calibrated = calibration.run(spec, held_out, workers, batch_configs) if spec.densities else []
        if calibrated:
            spec = calibration.calibrated_spec(spec, calibrated)
        tasks = plan_tasks(docs, list(spec.configs), n_shards, batch_configs, spec.agreement)
        recorded_spec = {
            **spec.to_json(),
            "tokenization": recorded_tokenization,
            "spec_hash": fingerprint,
            "dtype_resolved": dtype,
            "compile_resolved": engine.compile,
            "batch_configs_resolved": batch_configs,
            "schema_version": SCHEMA_VERSION,
            "versions": _versions(),
            "hardware": _hardware(pool),
            "n_shards": n_shards,
            "tasks": {t.task_id: sorted({c.method for c in t.configs}) for t in tasks},
            "calibration": calibration.to_json(held_out, calibrated) if calibrated else None,
        }
        attempt = _claim(lake, run_id, previous, recorded_spec, docs_table, tasks, tic)
        print(
            f"kvorch: run {run_id}: {len(docs)} docs x {len(spec.configs)} configs = {len(tasks)} tasks "
            f"({len(attempt.done)} done, {len(attempt.todo)} to go) on {pool.n_actors} {pool.device} actor(s) "
            f"-> {lake.uri}",
            file=sys.stderr,
        )
        result = _sweep(attempt, workers, show_progress, max_retries)
    return JobResult(
        run_id,
        result.rows_written,
        len(tasks),
        result.failures,
        time.perf_counter() - tic,
        incomplete.merged(attempt.kept, result.config_failures),
    )


@dataclass(frozen=True)
class _Attempt:
    """One attempt at a run: its tasks, those earlier attempts did, and what they recorded."""

    lake: Lake
    run_id: str
    tasks: list[Task]
    done: set[str]
    earlier: dict | None  # the previous attempt's status.json
    kept: list[dict]  # incomplete configs of tasks that stay done (the others record theirs anew)
    started: float  # perf_counter at submission

    @property
    def todo(self) -> list[Task]:
        return [t for t in self.tasks if t.task_id not in self.done]


def _claim(
    lake: Lake, run_id: str, previous: dict | None, spec: dict, docs: pa.Table, tasks: list[Task], tic: float
) -> _Attempt:
    """Claim the run in the lake: a fresh run writes its spec and documents; a resumed one
    drops its damaged parts and leftovers, whose tasks are then not done and run again."""
    # The earlier attempt's status, read before the claim below replaces it.
    earlier = lake.read_status(run_id) if previous else None
    # Claim the run before spec.json exists, so no other submission takes it for an abandoned one.
    lake.write_status(run_id, run_status.claimed(incomplete.recorded(earlier)))
    if previous:
        found = integrity.audit(lake, run_id)
        lake.delete(sorted(found.damaged) + lake.leftovers(run_id))
        done = found.done
    else:
        done = set()
        lake.write_spec(run_id, spec)
        lake.write_docs(run_id, docs)
    return _Attempt(lake, run_id, tasks, done, earlier, incomplete.carried_over(earlier, done), tic)


def _sweep(attempt: _Attempt, workers: actors.WorkerPool, show_progress: bool, max_retries: int) -> actors.PoolResult:
    """Run the attempt's tasks on the pool, each task's rows into the lake as it finishes, the
    status kept fresh meanwhile (heartbeat, events) and recorded at the end, however it ends."""
    lake, run_id = attempt.lake, attempt.run_id
    # Chunk-level counts, for the bar and for the Ray metrics (orchestrator/pool/progress.py).
    total = sum(t.cost for t in attempt.tasks)
    counter = start_counter(total, total - sum(t.cost for t in attempt.todo))
    progress = Progress(attempt.tasks, attempt.done, show_progress, counter)
    result = actors.PoolResult()

    def running(state: actors.PoolResult) -> dict:
        failures = incomplete.merged(attempt.kept, state.config_failures)
        return run_status.running(failures, attempts.running(attempt.earlier, state))

    beat = Heartbeat(lake, run_id, running(result))
    recorded = 0

    def on_rows(task: Task, rows: pa.Table) -> int:
        try:
            return lake.write_rows(run_id, task.task_id, rows, [c.method for c in task.configs])
        except OSError as exc:  # disk full, quota, a lost mount: stop, keep what is written
            raise KvorchError(
                f"cannot write to lake {lake.uri} ({exc.strerror or exc}); free space or fix the lake, "
                "then run the same command again: finished tasks are kept"
            ) from None

    def on_progress(task: Task, succeeded: bool, state: actors.PoolResult) -> None:
        nonlocal recorded
        progress.update(task, succeeded, state)
        # A new incomplete config is recorded at once: a killed driver must not lose it, since
        # the resume keeps the task's rows and never runs it again; so is a fault event. The
        # heartbeat thread refreshes the status in between.
        news = len(state.config_failures) + len(state.events)
        if news > recorded:
            beat.update(running(state))
            recorded = news

    status, reason = "interrupted", "the driver stopped"
    try:
        with beat, progress:
            if attempt.todo:
                actors.run_pool(attempt.todo, workers, result, on_rows, on_progress, max_retries, counter)
        status = "failed" if result.failures else "finished"
        reason = failed_tasks_line(result.failures, len(attempt.tasks)) if result.failures else ""
    except BaseException as exc:
        status, reason = ending(exc)
        raise
    finally:
        progress.close()
        with contextlib.suppress(Exception):  # a lost counter must not hide how the run ended
            ray.kill(counter)
        write_final_status(
            lake,
            run_id,
            run_status.ended(
                status=status,
                reason=reason,
                tasks_total=len(attempt.tasks),
                tasks_resumed=len(attempt.done),
                failures=result.failures,
                config_failures=incomplete.merged(attempt.kept, result.config_failures),
                workers=result.workers,
                # rows, tasks_done, retries and events of the whole run; this attempt's under "attempt"
                figures=attempts.totals(lake, run_id, attempt.earlier, attempt.done, result),
                seconds=round(time.perf_counter() - attempt.started, 3),
            ),
        )
    return result


def _versions() -> dict:
    names = ("kvorch", "torch", "transformers", "ray", "pyarrow", "duckdb")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _hardware(pool: actors.PoolPlan) -> dict:
    resources = ray.cluster_resources()
    return {
        "platform": platform.platform(),
        "cluster_cpus": resources.get("CPU"),
        "cluster_gpus": resources.get("GPU", 0),
        "actors": pool.n_actors,
        "device": pool.device,
        "cpus_per_actor": pool.num_cpus,
        "gpus_per_actor": pool.num_gpus,
    }
