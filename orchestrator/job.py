"""A submission end to end: validate, tokenize, plan, run on Ray, stream rows into the lake.

Everything that can be wrong with the input is checked before the lake is touched, so a bad
submission never leaves anything behind and never alters existing runs.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import ray
from tqdm import tqdm

from orchestrator import calibration, driver
from orchestrator.corpus import load_corpus
from orchestrator.errors import KvorchError
from orchestrator.lake import Lake, new_run_id
from orchestrator.planner import TokenizedDocument, check_lengths, plan_tasks
from orchestrator.spec import JobSpec
from workers.actor import Task, WorkerSettings
from workers.models import load_tokenizer, resolve_model, tokenize
from workers.schema import DOC_SCHEMA, SCHEMA_VERSION


@dataclass(frozen=True)
class JobResult:
    run_id: str
    rows_written: int
    tasks: int
    failures: dict[str, str]
    seconds: float


def submit(
    spec: JobSpec, lake: Lake, run_id: str | None = None, address: str | None = None, show_progress: bool = True
) -> JobResult:
    tic = time.perf_counter()
    run_id = run_id or new_run_id()
    try:
        resolve_model(spec.model)
    except ValueError as exc:
        raise KvorchError(f"--model: {exc}") from None
    corpus = load_corpus(spec.corpus)
    documents = corpus[: spec.max_docs]
    tokenizer = load_tokenizer(spec.model)
    docs = [TokenizedDocument(d, tokenize(tokenizer, d.text, spec.max_tokens)) for d in documents]
    check_lengths(docs, spec.chunk_size)
    held_out = calibration.held_out_documents(corpus, spec, tokenizer) if spec.densities else []
    lake.ensure_writable()
    if lake.run_exists(run_id):
        raise KvorchError(
            f"run {run_id} already exists in lake {lake.uri}; pass a new --run-id (or none for a fresh one)"
        )

    driver.start_ray(address, namespace=f"kvorch-{run_id}")
    pool = driver.plan_pool(spec.actors, spec.device)
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if pool.device == "cuda" else "float32")
    settings = WorkerSettings(spec.model, dtype, pool.device, pool.threads, spec.engine)
    calibrated = calibration.run(spec, held_out, settings, pool) if spec.densities else []
    if calibrated:
        spec = calibration.calibrated_spec(spec, calibrated)
    tasks = plan_tasks(docs, list(spec.configs), pool.n_actors, spec.batch_configs)

    lake.write_spec(
        run_id,
        {
            **spec.to_json(),
            "dtype_resolved": dtype,
            "schema_version": SCHEMA_VERSION,
            "versions": _versions(),
            "hardware": _hardware(pool),
            "tasks": [t.task_id for t in tasks],
            "calibration": calibration.to_json(held_out, calibrated) if calibrated else None,
        },
    )
    lake.write_docs(run_id, _docs_table(docs))
    print(
        f"kvorch: run {run_id}: {len(docs)} docs x {len(spec.configs)} configs = {len(tasks)} tasks "
        f"on {pool.n_actors} {pool.device} actor(s) -> {lake.uri}",
        file=sys.stderr,
    )

    bar = tqdm(
        total=sum(t.cost for t in tasks), unit="tok", unit_scale=True, disable=not show_progress, desc="token-configs"
    )

    def on_rows(task: Task, rows: pa.Table) -> int:
        return lake.write_rows(run_id, task.task_id, rows)

    def on_progress(task: Task) -> None:
        bar.update(task.cost)

    status = "interrupted"
    result = driver.PoolResult()
    try:
        result = driver.run_pool(tasks, settings, pool, on_rows, on_progress)
        status = "failed" if result.failures else "finished"
    except ray.exceptions.RayActorError as exc:
        status = "failed"
        raise KvorchError(f"a worker failed to start: {str(exc).splitlines()[-1]}; check --model/--device") from None
    finally:
        bar.close()
        lake.write_status(
            run_id,
            {
                "status": status,
                "rows": result.rows_written,
                "tasks_done": result.tasks_done,
                "failures": result.failures,
                "workers": result.workers,
                "seconds": round(time.perf_counter() - tic, 3),
            },
        )
    return JobResult(run_id, result.rows_written, len(tasks), result.failures, time.perf_counter() - tic)


def _docs_table(docs: list[TokenizedDocument]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "doc_id": d.document.doc_id,
                "source": d.document.source,
                "n_chars": len(d.document.text),
                "n_tokens": len(d.token_ids),
                "sha256": hashlib.sha256(d.document.text.encode()).hexdigest(),
            }
            for d in docs
        ],
        schema=DOC_SCHEMA,
    )


def _versions() -> dict:
    names = ("kvorch", "torch", "transformers", "ray", "pyarrow", "duckdb")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _hardware(pool: driver.PoolPlan) -> dict:
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
