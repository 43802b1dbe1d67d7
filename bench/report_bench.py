"""Benchmark: ``kvorch report`` on a 10-million-row lake.

Generates a synthetic lake in the real row schema (workers/contract/schema.py) with numpy + pyarrow —
N documents x 64 chunks of 128 tokens x 78 configs (8 methods, 5 of them at 15 thresholds),
written as one part per (shard, method) like a real run — then times the CLI end to end in a
fresh process (interpreter start and imports included), best of --repeat:

    python bench/report_bench.py [--lake /tmp/kvorch-bench-lake] [--rows 10000000] [--repeat 3]

The lake is reused when it already holds the requested row count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from orchestrator.lake.store import Lake
from workers.contract.schema import ROW_SCHEMA

CHUNKS, CHUNK, HEADS, WINDOW, SHARDS = 64, 128, 30 * 3, 128, 16
FIXED = ("baseline", "window", "streaming_llm")
SWEPT = ("random", "knorm", "expected_attention", "observed_attention", "h2o")
THRESHOLDS = 15


def configs() -> list[tuple[str, str, float | None, float]]:
    """(method, config, threshold, density) for every config; density of the compressible region."""
    out = [
        ("baseline", "baseline", None, 1.0),
        ("window", "window", None, 0.0),
        ("streaming_llm", "streaming_llm", None, 0.0),
    ]
    for method in SWEPT:
        for i in range(THRESHOLDS):
            tau = round(0.05 * (i + 1), 3)
            out.append((method, f"{method}@{tau:g}", tau, 1.0 - tau))
    return out


def schema_table(columns: dict[str, object], n: int) -> pa.Table:
    """A table in ROW_SCHEMA from the columns this generator makes up: a column of the schema it
    does not make is null when the schema allows it, else an error naming it, so a new column
    in workers/contract/schema.py never breaks the bench silently or with a KeyError."""
    missing = [f for f in ROW_SCHEMA if f.name not in columns]
    required = [f.name for f in missing if not f.nullable]
    if required:
        raise SystemExit(f"report_bench: ROW_SCHEMA has non-nullable column(s) {', '.join(required)}; generate them")
    filled = {**columns, **{f.name: pa.nulls(n, f.type) for f in missing}}
    return pa.table({f.name: filled[f.name] for f in ROW_SCHEMA}, schema=ROW_SCHEMA)


def generate(lake: Lake, run_id: str, n_docs: int) -> int:
    rng = np.random.default_rng(0)
    lake.write_spec(run_id, {"model": "synthetic", "configs": [c[1] for c in configs()]})
    doc_ids = np.array([f"doc-{i:05d}" for i in range(n_docs)], dtype=object)
    base_nll = rng.uniform(200, 500, size=(n_docs, CHUNKS))
    written = 0
    for shard, docs in enumerate(np.array_split(np.arange(n_docs), SHARDS)):
        doc = np.repeat(docs, CHUNKS)
        chunk = np.tile(np.arange(CHUNKS, dtype=np.int32), len(docs))
        start = chunk * CHUNK
        total = start.astype(np.int64) * HEADS
        in_window = np.minimum(start, WINDOW).astype(np.int64) * HEADS
        n_tokens = np.where(chunk == CHUNKS - 1, CHUNK - 1, CHUNK).astype(np.int32)
        parts = []
        for method, config, tau, density in configs():
            kept = (in_window + density * (total - in_window)).astype(np.int64)
            nll = base_nll[docs].ravel() * (1 + (1 - density) * rng.uniform(0.0, 0.2, size=doc.size))
            n = doc.size
            parts.append(
                schema_table(
                    {
                        "doc_id": pa.array(doc_ids[doc], pa.string()),
                        "chunk_index": chunk,
                        "chunk_start": start,
                        "chunk_end": start + CHUNK,
                        "config": pa.array([config] * n, pa.string()),
                        "press": pa.array([config.split("@")[0]] * n, pa.string()),
                        "method_params": pa.array(["{}"] * n, pa.string()),
                        "threshold": pa.array([tau] * n, pa.float64()),
                        "policy": pa.array(["threshold"] * n, pa.string()),
                        "ratio": pa.nulls(n, pa.float64()),
                        "window": np.full(n, WINDOW, np.int32),
                        "n_sink": np.zeros(n, np.int32),
                        "protected_window": np.zeros(n, np.int32),
                        "nll_sum": nll,
                        "n_tokens": n_tokens,
                        "n_correct": (n_tokens * 0.45).astype(np.int32),
                        "keys_total": total,
                        "keys_in_window": in_window,
                        "keys_outside_window": total - in_window,
                        "keys_kept": kept,
                        "keys_discarded_outside_window": total - kept,
                        "keys_protected": in_window,
                        "keys_kept_unprotected": kept - in_window,
                        "forward_seconds": rng.uniform(0.05, 0.1, size=n),
                        "batch_size": np.full(n, 16, np.int32),
                        "worker": pa.array([f"kvorch-worker-{shard % 4}"] * n, pa.string()),
                        "device": pa.array(["cuda:0"] * n, pa.string()),
                        "method": pa.array([method] * n, pa.string()),
                    },
                    n,
                )
            )
        written += lake.write_rows(run_id, f"s{shard:04d}", pa.concat_tables(parts))
    lake.write_status(run_id, {"status": "finished", "rows": written, "workers": []})
    return written


def time_cli(args: list[str], repeat: int) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (user + sys) of the command in a fresh process.

    CPU seconds are reported too because a shared machine's load stretches wall time; on an
    otherwise idle machine wall time is about CPU time / cores used.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        tic = time.perf_counter()
        command = [sys.executable, "-c", "from orchestrator.cli import main; main()", *args]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        best_wall = min(best_wall, time.perf_counter() - tic)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best_cpu = min(best_cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best_wall, best_cpu


def bench_lake(path: str, at_least: int) -> tuple[Lake, int, int]:
    """The synthetic lake at ``path`` with at least ``at_least`` rows: (lake, rows, documents).
    Generated once and kept (``bench.json`` records its size), so reruns time the same lake."""
    n_docs = -(-at_least // (CHUNKS * len(configs())))
    lake = Lake(path)
    marker = Path(path) / "bench.json"
    if not marker.exists() or json.loads(marker.read_text()).get("docs") != n_docs:
        tic = time.perf_counter()
        rows = generate(lake, "bench", n_docs)
        marker.write_text(json.dumps({"docs": n_docs, "rows": rows}))
        print(f"generated {rows:,} rows in {time.perf_counter() - tic:.1f} s -> {path}", file=sys.stderr)
    return lake, json.loads(marker.read_text())["rows"], n_docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="/tmp/kvorch-bench-lake", help="where the synthetic lake is written")
    parser.add_argument("--rows", type=int, default=10_000_000, help="at least this many rows")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command; the best is reported")
    args = parser.parse_args()
    lake, rows, n_docs = bench_lake(args.lake, args.rows)
    print(f"lake: {rows:,} rows, {n_docs} docs, {len(configs())} configs; cpus: {os.cpu_count()}")
    print(f"load average before timing: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for label, extra in [("report (compare)", []), ("report --table all", ["--table", "all"])]:
        wall, cpu = time_cli(["report", "--lake", args.lake, *extra], args.repeat)
        print(f"kvorch {label}: {wall:.2f} s wall, {cpu:.2f} s CPU (best of {args.repeat}, fresh process)")


if __name__ == "__main__":
    main()
