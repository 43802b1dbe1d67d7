"""A submission end to end: validate, tokenize, plan, run on Ray, stream rows into the lake.

Everything that can be wrong with the input is checked before the lake is touched, so a bad
submission never leaves anything behind and never alters existing runs; that includes a method
that cannot run on the model, which the preflight (``EvalWorker.preflight``) finds on the pool's
first ready actor. A submission whose spec matches an unfinished run (or ``--resume RUN_ID``)
computes only that run's missing tasks. What it records of a run is built in one place each:
spec.json in orchestrator/sweep/spec_record.py, status.json in orchestrator/lake/run_status.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
from orchestrator.sweep.endings import ending, interrupts_as_exceptions, outcome, write_final_status
from orchestrator.sweep.heartbeat import Heartbeat
from orchestrator.sweep.planner import TokenizedDocument, check_lengths, default_shards, plan_tasks
from orchestrator.sweep.progress import Progress
from orchestrator.sweep.resume import choose_run, same_spec_runs, spec_hash
from orchestrator.sweep.run_lock import RunLock
from orchestrator.sweep.spec import JobSpec
from orchestrator.sweep.spec_record import Resolved, SpecRecord, identity
from workers.actor import EvalWorker
from workers.contract.models import resolve_dtype
from workers.contract.plan import Task, WorkerSettings
from workers.contract.settings import EngineSettings


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
    started = time.perf_counter()
    if run_id is not None:
        check_run_id(run_id, "--resume" if resume else "--run-id")
    inputs = _prepare(spec, lake, run_id, resume, started)
    if show_progress:  # after every check of the input, so that an error stays one line
        what = f"probes of --task {spec.task}" if spec.task else f"documents of corpus {spec.corpus}"
        print(
            f"kvorch: {len(inputs.docs)} {what} read, tokenized and checked in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    already = _what_exists(inputs)
    if already is not None:
        return already
    options = _PoolOptions(
        show_progress=show_progress,
        max_retries=max_retries,
        gpus_per_actor=gpus_per_actor,
        actor_timeout=actor_timeout,
    )
    with RunLock(lake, inputs.run_id):
        started_ray, ray_before = False, ray.is_initialized()
        try:
            # SIGTERM while Ray starts is an interrupt too (exit 143, the resume line), not a silent 15.
            with interrupts_as_exceptions():
                started_ray = actors.start_ray(address, f"kvorch-{inputs.run_id}", connect_timeout)
            options = dataclasses.replace(options, fixed_cluster=started_ray)
            # Again after Ray starts: its core worker installs a SIGTERM handler of its own, which ours replaces.
            with interrupts_as_exceptions():
                return _run(inputs, options)
        finally:
            # A Ray this call started, also one whose start an interrupt cut short.
            if started_ray or (address is None and not ray_before and ray.is_initialized()):
                ray.shutdown()


@dataclass(frozen=True)
class _Inputs:
    """What a submission settles before it touches Ray: its documents, checked, and its run."""

    spec: JobSpec
    lake: Lake
    run_id: str
    previous: dict | None  # the run's stored spec.json when resuming, None for a fresh run
    fingerprint: str  # resume.spec_hash of the spec's identity and the documents
    tokenization: dict  # how the token ids were made (spec_record.identity)
    docs: list[TokenizedDocument]
    docs_table: pa.Table
    held_out: list[TokenizedDocument]  # calibration's documents (--densities), else none
    started: float  # perf_counter at submission


@dataclass(frozen=True)
class _PoolOptions:
    """How the pool runs the tasks: never what they compute."""

    show_progress: bool
    max_retries: int
    gpus_per_actor: float | None
    actor_timeout: float  # seconds Ray has to place an actor
    fixed_cluster: bool = False  # the embedded local Ray, which no node joins


def _what_exists(inputs: _Inputs) -> JobResult | None:
    """Say on stderr, before Ray starts, what of this submission's work the lake already holds:
    the run it resumes and how much is left, or the other runs of the same spec that a new run
    computes again. A named run that is finished and complete has nothing left: its result,
    without starting Ray (a resubmitted ``--run-id`` once spent 35 s on Ray to write 0 rows)."""
    lake, run_id = inputs.lake, inputs.run_id
    if inputs.previous is None:
        for other, state in same_spec_runs(lake, inputs.fingerprint, but=run_id):
            if state == "running":
                said = f"run {other} of this spec is being computed right now by another kvorch submit (kvorch status)"
            else:
                said = f"run {other} already holds this spec's results (kvorch report --run {other})"
            print(f"kvorch: {said}; this submission computes them again as new run {run_id}", file=sys.stderr)
        return None
    status = lake.read_status(run_id)
    found = integrity.audit(lake, run_id)
    planned, done = len(found.planned), len(found.done)
    if run_status.RunStatus.read(status).status == "finished" and found.complete:
        print(f"kvorch: run {run_id} is finished and complete ({planned} tasks): nothing to compute", file=sys.stderr)
        return JobResult(
            run_id=run_id,
            rows_written=0,
            tasks=planned,
            failures={},
            seconds=time.perf_counter() - inputs.started,
            config_failures=incomplete.recorded(status),
        )
    if not run_status.driver_alive(status):  # a live driver's run is refused by the run lock, with its own line
        print(
            f"kvorch: resuming run {run_id} of this spec: {done} of {planned} tasks done, "
            f"{planned - done} to compute{' (damaged parts again)' if found.damaged else ''}",
            file=sys.stderr,
        )
    return None


def _prepare(spec: JobSpec, lake: Lake, run_id: str | None, resume: bool, started: float) -> _Inputs:
    """Everything that can be wrong with the input, checked before the lake is touched; then the
    run to write: ``run_id``, else an unfinished run of the same spec and documents, else a new one."""
    if spec.compile != "off":
        _check_compile_cache(spec.compile_cache)
    tokens, corpus = model_inputs(spec.model, spec.corpus, spec.bos)
    docs = documents.run_documents(spec, tokens, corpus)
    check_lengths(docs, spec.chunk_size)
    held_out = calibration.held_out_documents(corpus, spec, tokens) if spec.densities else []
    lake.ensure_writable()
    docs_table = documents.docs_table(docs)
    # The token ids are part of what a run is: a resume under another tokenization would mix rows.
    tokenization = tokens.fingerprint(d.token_ids for d in docs)
    spec_json = identity(spec, tokenization)
    fingerprint = spec_hash(spec_json, docs_table)
    target = choose_run(lake, run_id, fingerprint, spec_json, must_exist=resume)
    return _Inputs(
        spec=spec,
        lake=lake,
        run_id=target.run_id,
        previous=target.previous,
        fingerprint=fingerprint,
        tokenization=tokenization,
        docs=docs,
        docs_table=docs_table,
        held_out=held_out,
        started=started,
    )


def _check_compile_cache(directory: str) -> None:
    """Refuse, before the model loads, a ``--compile-cache`` that cannot be a directory here (a
    file, or a path through one): the workers would otherwise fail making it, after loading the
    model, with a hint naming other options. A path that does not exist yet is made by the workers."""
    path = Path(directory).expanduser()
    for step in (path, *path.parents):
        if step.exists() and not step.is_dir():
            raise KvorchError(
                f"--compile-cache {directory}: {step} is a file, not a directory; pass a directory "
                "(default ~/.cache/kvorch/compile), or --compile off"
            )
        if step.exists():
            return


def _run(inputs: _Inputs, options: _PoolOptions) -> JobResult:
    """The submission on Ray: the pool, the preflight, the calibration, the plan, the claim of
    the run in the lake, then the sweep."""
    spec = inputs.spec
    pool = actors.plan_pool(spec.actors, spec.device, options.gpus_per_actor, options.fixed_cluster)
    resolved, engine = _resolve(inputs, pool, options.actor_timeout)
    questions = [d.question for d in inputs.docs if d.question is not None]
    generation = spec.generation_settings(max((q.max_new_tokens for q in questions), default=1))
    settings = WorkerSettings(
        spec.model, resolved.dtype, pool.device, pool.threads, engine, spec.compile_cache, generation
    )
    with actors.WorkerPool(pool, EvalWorker, (settings,), options.actor_timeout) as workers:
        shown = options.show_progress
        with _phase(f"loading {spec.model} on {pool.n_actors} {pool.device} actor(s)", shown):
            workers.first_ready()
        # Still nothing written: a config that cannot run on this model stops the job here.
        with _phase(f"preflight: {len(spec.configs)} configs, each alone on a 16-token document", shown):
            workers.preflight(list(spec.configs))
        # Calibration is deterministic for a given spec, documents and dtype: a resumed run redoes
        # it and gets the thresholds, hence the tasks, of its first attempt.
        calibrated = (
            calibration.run(spec, inputs.held_out, workers, resolved.batch_configs, shown) if spec.densities else []
        )
        if calibrated:
            spec = calibration.calibrated_spec(spec, calibrated)
        tasks = plan_tasks(inputs.docs, list(spec.configs), resolved.n_shards, resolved.batch_configs, spec.agreement)
        record = SpecRecord(
            spec=spec,
            tokenization=inputs.tokenization,
            spec_hash=inputs.fingerprint,
            resolved=resolved,
            tasks=tasks,
            calibration=calibration.to_json(inputs.held_out, calibrated) if calibrated else None,
            pool=pool,
        )
        attempt = _claim(inputs, record, tasks)
        print(
            f"kvorch: run {inputs.run_id}: {len(inputs.docs)} docs x {len(spec.configs)} configs = {len(tasks)} "
            f"tasks ({len(attempt.done)} done, {len(attempt.todo)} to go) on {pool.n_actors} {pool.device} "
            f"actor(s){actors.fitting(pool)} -> {inputs.lake.uri}",
            file=sys.stderr,
        )
        result = _sweep(attempt, workers, options.show_progress, options.max_retries)
    return JobResult(
        run_id=inputs.run_id,
        rows_written=result.rows_written,
        tasks=len(tasks),
        failures=result.failures,
        seconds=time.perf_counter() - inputs.started,
        config_failures=incomplete.merged(attempt.kept, result.config_failures),
    )


@contextlib.contextmanager
def _phase(what: str, shown: bool) -> Iterator[None]:
    """With the progress bar (``--progress``), one stderr line when a slow start phase begins
    and its seconds when it ends: between Ray's dashboard line and the first progress line,
    35-135 s once passed without a word. A phase that fails ends with its error instead."""
    if shown:
        print(f"kvorch: {what} ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    yield
    if shown:
        print(f"kvorch: {what.split(':')[0]}: done in {time.perf_counter() - began:.1f} s", file=sys.stderr)


def _resolve(inputs: _Inputs, pool: actors.PoolPlan, wait_s: float) -> tuple[Resolved, EngineSettings]:
    """What this pool settles that the spec leaves open, and the engine settings. A resume keeps
    its first attempt's shards and batch size, so it plans the same tasks, and must run in the
    same dtype, or its rows would mix two precisions."""
    spec = inputs.spec
    earlier = Resolved.recorded(inputs.previous) if inputs.previous else None
    dtype = resolve_dtype(spec.dtype, pool.device)
    if earlier and earlier.dtype != dtype:
        raise KvorchError(
            f"run {inputs.run_id} was computed in {earlier.dtype}, this pool would use {dtype}; "
            f"pass --dtype {earlier.dtype} to resume it"
        )
    engine = compile_check.resolve_compile(spec.engine_for(pool.device), spec.compile, pool.device)
    answering = any(d.question is not None for d in inputs.docs)
    note = compile_check.eager_note(engine, list(spec.configs), answering)
    if note:
        print(f"kvorch: {note}", file=sys.stderr)
    if earlier:
        n_shards, batch_configs = earlier.n_shards, earlier.batch_configs
    else:
        n_shards = default_shards(pool.n_actors)
        longest = max(len(d.token_ids) for d in [*inputs.docs, *inputs.held_out])
        batch_configs = batching.resolve(spec, pool, dtype, engine, longest, wait_s)
    return Resolved(dtype=dtype, compile=engine.compile, batch_configs=batch_configs, n_shards=n_shards), engine


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


def _claim(inputs: _Inputs, record: SpecRecord, tasks: list[Task]) -> _Attempt:
    """Claim the run in the lake and make its setup whole: a fresh run writes its spec and
    documents; a resumed one rewrites any setup file an earlier attempt did not finish (a full
    disk between spec.json and docs.parquet), then drops its damaged parts and leftovers, whose
    tasks are then not done and run again. Nothing runs before the setup is whole, so no run is
    ever ``finished`` without it. A lake that cannot take a write stops here, in one line."""
    lake, run_id = inputs.lake, inputs.run_id
    try:
        # The earlier attempt's status, read before the claim below replaces it.
        earlier = lake.read_status(run_id) if inputs.previous else None
        # Claim the run before spec.json exists, so no other submission takes it for an abandoned one.
        lake.write_status(run_id, run_status.claimed(incomplete.recorded(earlier)))
        if not inputs.previous:
            lake.write_spec(run_id, record.to_json())
        if not inputs.previous or not lake.docs_sound(run_id):
            lake.write_docs(run_id, inputs.docs_table)
        if inputs.previous:
            found = integrity.audit(lake, run_id)
            lake.delete(sorted(found.damaged) + lake.leftovers(run_id))
            done = found.done
        else:
            done = set()
    except OSError as exc:  # disk full, quota, a lost mount
        raise KvorchError(
            f"cannot write to lake {lake.uri} ({exc.strerror or exc}) while setting up run {run_id}; free space "
            "or fix the lake, then run the same command again: the run's setup is rewritten"
        ) from None
    return _Attempt(lake, run_id, tasks, done, earlier, incomplete.carried_over(earlier, done), inputs.started)


def _sweep(attempt: _Attempt, workers: actors.WorkerPool, show_progress: bool, max_retries: int) -> actors.PoolResult:
    """Run the attempt's tasks on the pool, each task's rows into the lake as it finishes, the
    status kept fresh meanwhile (heartbeat, events) and recorded at the end, however it ends."""
    # Chunk-level counts, for the bar and for the Ray metrics (orchestrator/pool/progress.py).
    total = sum(t.cost for t in attempt.tasks)
    counter = start_counter(total, total - sum(t.cost for t in attempt.todo))
    progress = Progress(attempt.tasks, attempt.done, show_progress, counter)
    result = actors.PoolResult()
    beat = Heartbeat(attempt.lake, attempt.run_id, _running_status(attempt, result))
    recorded = 0

    def on_progress(task: Task, succeeded: bool, state: actors.PoolResult) -> None:
        nonlocal recorded
        progress.update(task, succeeded, state)
        # A new incomplete config is recorded at once: a killed driver must not lose it, since
        # the resume keeps the task's rows and never runs it again; so is a fault event. The
        # heartbeat thread refreshes the status in between.
        news = len(state.config_failures) + len(state.events)
        if news > recorded:
            beat.update(_running_status(attempt, state))
            recorded = news

    status, reason = "interrupted", "the driver stopped"
    try:
        with beat, progress:
            if attempt.todo:
                on_rows = functools.partial(_write_rows, attempt.lake, attempt.run_id)
                actors.run_pool(attempt.todo, workers, result, on_rows, on_progress, max_retries, counter)
        status, reason = outcome(result.failures, len(attempt.tasks))
    except BaseException as exc:
        status, reason = ending(exc)
        raise
    finally:
        progress.close()
        with contextlib.suppress(Exception):  # a lost counter must not hide how the run ended
            ray.kill(counter)
        write_final_status(attempt.lake, attempt.run_id, _final_status(attempt, result, status, reason))
    return result


def _write_rows(lake: Lake, run_id: str, task: Task, rows: pa.Table) -> int:
    """Write a finished task's rows; a lake that cannot take them stops the run, in one line."""
    try:
        return lake.write_rows(run_id, task.task_id, rows, [c.method for c in task.configs])
    except OSError as exc:  # disk full, quota, a lost mount: stop, keep what is written
        raise KvorchError(
            f"cannot write to lake {lake.uri} ({exc.strerror or exc}); free space or fix the lake, "
            "then run the same command again: finished tasks are kept"
        ) from None


def _running_status(attempt: _Attempt, state: actors.PoolResult) -> dict:
    """The status while tasks run (the heartbeat adds the driver's mark to each write)."""
    failures = incomplete.merged(attempt.kept, state.config_failures)
    return run_status.running(failures, attempts.running(attempt.earlier, state))


def _final_status(attempt: _Attempt, result: actors.PoolResult, status: str, reason: str) -> dict:
    """The status the attempt ends with: the run's figures over every attempt, this one's apart."""
    return run_status.ended(
        status=status,
        reason=reason,
        tasks_total=len(attempt.tasks),
        tasks_resumed=len(attempt.done),
        failures=result.failures,
        config_failures=incomplete.merged(attempt.kept, result.config_failures),
        workers=result.workers,
        figures=attempts.totals(attempt.lake, attempt.run_id, attempt.earlier, attempt.done, result),
        seconds=round(time.perf_counter() - attempt.started, 3),
    )
