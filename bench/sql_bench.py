"""Benchmark: what the sealed ``kvorch sql`` connection costs against DuckDB's own Parquet reader.

``kvorch sql`` and ``LakeReader.sql`` run on a DuckDB that opens no file (Arrow datasets over the
verified parts, then external access off: ``orchestrator/lake/readonly.py``); kvorch's reports
keep DuckDB's Parquet reader (``orchestrator/lake/queries.py``'s ``connect``), which is what
``kvorch sql`` used before. On the synthetic lake of ``report_bench.py`` (10 million rows by
default) this times each query on both connections in the same process, alternating, best of
--repeat, checks that both return the same rows, and prints the ratio:

    python bench/sql_bench.py [--lake /tmp/kvorch-bench-lake] [--rows 10000000] [--repeat 5]

The lake is reused when it already holds the requested row count.
"""

from __future__ import annotations

import argparse
import os
import time

from report_bench import bench_lake

from orchestrator.lake import integrity
from orchestrator.lake.queries import connect
from orchestrator.lake.readonly import connect_sealed

QUERIES = {
    "group by config": (
        "SELECT method, config, sum(nll_sum) / sum(n_tokens) AS nll, count(*) AS n "
        "FROM chunks GROUP BY ALL ORDER BY ALL"
    ),
    "config_metrics (report compare)": "SELECT * FROM config_metrics('bench') ORDER BY config",
    "filter one config": (
        "SELECT doc_id, sum(nll_sum) AS nll FROM chunks WHERE config = 'knorm@0.3' GROUP BY ALL ORDER BY ALL"
    ),
    "numeric sums": "SELECT sum(keys_kept) / sum(keys_total) AS density, avg(forward_seconds) AS f FROM chunks",
    "count(*)": "SELECT count(*) AS n FROM chunks",
    "top 5 rows, every column": "SELECT * FROM chunks ORDER BY nll_sum DESC, doc_id, config LIMIT 5",
}


def rounded(rows: list[tuple]) -> list[tuple]:
    """Rows with floats to 9 significant digits: parallel sums add in another order each run."""
    return [tuple(float(f"{v:.9g}") if isinstance(v, float) else v for v in row) for row in rows]


def timed(con, query: str) -> float:
    tic = time.perf_counter()
    con.execute(query).fetchall()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="/tmp/kvorch-bench-lake", help="where the synthetic lake is written")
    parser.add_argument("--rows", type=int, default=10_000_000, help="at least this many rows")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query and connection; the best counts")
    args = parser.parse_args()
    lake, rows, _ = bench_lake(args.lake, args.rows)
    audits = integrity.audit_lake(lake)
    print(f"lake: {rows:,} rows, {len(lake.parts())} parts; cpus: {os.cpu_count()}")
    print(f"load average before timing: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    opened = {"old": [], "sealed": []}
    for _ in range(args.repeat):  # the views alone; the audit (sha256 of every part) is shared
        for name, opener in (("old", connect), ("sealed", connect_sealed)):
            tic = time.perf_counter()
            opener(lake, audits).close()
            opened[name].append(time.perf_counter() - tic)
    old, sealed = connect(lake, audits), connect_sealed(lake, audits)
    print(f"{'query':34}  {'old reader s':>12}  {'sealed s':>8}  {'sealed/old':>10}")
    print(f"{'open the views':34}  {min(opened['old']):12.3f}  {min(opened['sealed']):8.3f}  "
          f"{min(opened['sealed']) / min(opened['old']):9.2f}x")  # fmt: skip
    for label, query in QUERIES.items():
        if rounded(old.execute(query).fetchall()) != rounded(sealed.execute(query).fetchall()):
            raise SystemExit(f"sql_bench: {label}: the sealed connection returned other rows than the old reader")
        times = {"old": float("inf"), "sealed": float("inf")}
        for _ in range(args.repeat):  # alternating, so both see the same load
            for name, con in (("old", old), ("sealed", sealed)):
                times[name] = min(times[name], timed(con, query))
        print(f"{label:34}  {times['old']:12.3f}  {times['sealed']:8.3f}  {times['sealed'] / times['old']:9.2f}x")
    print("same rows from both connections: checked")


if __name__ == "__main__":
    main()
