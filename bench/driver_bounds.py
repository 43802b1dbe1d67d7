"""Benchmark: what the driver's bounds save (issue 38, points 9 and 10), each case in a fresh
process so that its peak memory is its own.

- **A long line under --max-tokens**: one line of ``--mb`` megabytes of the embedded corpus's
  text, of which ``--max-tokens`` ids are kept: tokenized whole (what kvorch did) against
  ``Tokenization.ids``, which tokenizes only the prefix those ids need. Both must give the same ids.
- **A large kvorch sql result**: ``SELECT repeat('x', N)`` under ``--memory-limit``: DuckDB's
  fetchall and printing (what kvorch did) against ``readonly.fetch_bounded``, which stops in one
  line once the fetched batches pass the limit.

    python bench/driver_bounds.py [--mb 20] [--max-tokens 256] [--sql-mb 400] [--memory-limit 200MB]

Prints one row per case: seconds and the process's peak RSS above what it held before the case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASE = r"""
import json, resource, sys, time
case, size, keep, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if case.startswith("line"):
    from orchestrator.corpus import load_corpus
    from workers.contract.models import EMBEDDED_MODEL, load_tokenizer
    from workers.contract.tokenization import resolve
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    text = " ".join(d.text for d in load_corpus("pydoc")).replace("\n", " ")
    text = (text * (size // len(text) + 1))[:size]
    before, began = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    if case == "line-whole":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:keep]
    else:
        ids = resolve(tokenizer, "off").ids(text, keep)
    outcome = f"{len(ids)} ids, sha {hash(tuple(ids)) & 0xffffffff:08x}"
else:
    import duckdb
    from orchestrator.lake.readonly import Limits, fetch_bounded, seal
    from orchestrator.errors import KvorchError
    from orchestrator.reports.formatting import render
    con = duckdb.connect()
    seal(con, limit)
    query = f"SELECT repeat('x', {size}) AS s"
    before, began = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    if case == "sql-fetchall":
        result = con.execute(query)
        outcome = f"printed {len(render([d[0] for d in result.description], result.fetchall(), 'table'))} chars"
    else:
        try:
            fetched = fetch_bounded(con, query, None, Limits(memory_limit=limit))
            outcome = f"printed {len(render(*fetched, 'table'))} chars"
        except KvorchError as exc:
            outcome = "refused: " + str(exc)[:40] + "..."
seconds = time.perf_counter() - began
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "outcome": outcome}))
"""


def run_case(case: str, size: int, keep: int, limit: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", CASE, case, str(size), str(keep), limit],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of the one long line")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--sql-mb", type=float, default=400.0, help="megabytes of the one SQL value")
    parser.add_argument("--memory-limit", default="200MB")
    args = parser.parse_args()
    line, value = int(args.mb * 1e6), int(args.sql_mb * 1e6)
    rows = [
        (f"{args.mb:g} MB line, --max-tokens {args.max_tokens}", "tokenized whole (before)", "line-whole", line),
        (f"{args.mb:g} MB line, --max-tokens {args.max_tokens}", "prefix (Tokenization.ids)", "line-prefix", line),
        (f"repeat('x', {value}), {args.memory_limit}", "fetchall + print (before)", "sql-fetchall", value),
        (f"repeat('x', {value}), {args.memory_limit}", "fetch_bounded", "sql-bounded", value),
    ]
    print(f"{'case':<40} {'path':<28} {'seconds':>8} {'peak MB':>8}  outcome")
    for what, path, case, size in rows:
        got = run_case(case, size, args.max_tokens, args.memory_limit)
        print(f"{what:<40} {path:<28} {got['seconds']:>8.2f} {got['peak_mb']:>8.0f}  {got['outcome']}")


if __name__ == "__main__":
    main()
