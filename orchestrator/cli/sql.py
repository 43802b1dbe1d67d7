"""``kvorch sql``: any read-only query over the lake's views.

The lake holds hours of GPU time, so this command can read it and nothing else, by construction:
the query runs on a sealed DuckDB that opens no file at all, to read or to write, whatever the
statement (``orchestrator/lake/readonly.py``); statements other than queries are also refused up
front, in one line. Each query is bounded by ``--timeout`` and ``--memory-limit``. Runs with
damaged parts or unfinished tasks are named on stderr: their missing rows are left out of
``chunks``, never half counted.
"""

from __future__ import annotations

import click

from orchestrator.cli.options import format_option, local_lake_option
from orchestrator.lake import integrity, readonly
from orchestrator.lake.queries import run_files
from orchestrator.lake.store import Lake
from orchestrator.reports.formatting import render


@click.command("sql")
@local_lake_option
@format_option
@click.option(
    "--timeout",
    type=float,
    default=readonly.DEFAULT_TIMEOUT_S,
    metavar="SECONDS",
    help="Interrupt the query after this many seconds.",
)
@click.option(
    "--memory-limit",
    default=readonly.DEFAULT_MEMORY_LIMIT,
    metavar="SIZE",
    help="DuckDB's memory for the query (500MB, 4GB, 25% of RAM); nothing spills to disk, so a query "
    "needing more fails.",
)
@click.argument("query")
def command(lake: str, fmt: str, timeout: float, memory_limit: str, query: str) -> None:
    """Run QUERY (read-only DuckDB SQL) over the lake's views.

    Views: chunks, docs, answers, runs, statuses, workers, scores, heads, and the macros of sql/_macros.sql.
    Only queries run (SELECT, with DESCRIBE, SHOW, SUMMARIZE, PIVOT, and EXPLAIN of one): DuckDB
    is sealed before the query, so no file can be read other than through the views, and none
    written.
    """
    limits = readonly.Limits(timeout, memory_limit)
    readonly.check_read_only(query)
    target = Lake(lake)
    audits = integrity.audit_lake(target)
    con = readonly.connect_sealed(target, audits, memory_limit)
    for line in [*integrity.left_out(audits), *run_files(target).problems]:
        click.echo(f"kvorch: warning: {line}", err=True)

    def fetch(con, query, params):
        return readonly.fetch_bounded(con, query, params, limits)

    fetched = readonly.run(con, query, fetch, limits=limits)
    if fetched is not None:
        click.echo(render(*fetched, fmt))
