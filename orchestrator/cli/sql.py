"""``kvorch sql``: any read-only query over the lake's views.

The lake holds hours of GPU time, so this command can read it and nothing else: statements other
than queries are refused, and DuckDB itself is locked to the lake's directory with no extension
installs (``orchestrator/lake/queries.py``). Runs with damaged parts or unfinished tasks are named on
stderr: their missing rows are left out of ``chunks``, never half counted.
"""

from __future__ import annotations

import click
import duckdb

from orchestrator.cli.options import format_option, lake_option
from orchestrator.errors import KvorchError
from orchestrator.lake import integrity
from orchestrator.lake.queries import check_read_only, connect
from orchestrator.lake.store import Lake
from orchestrator.reports.formatting import render


@click.command("sql")
@lake_option
@format_option
@click.argument("query")
def command(lake: str, fmt: str, query: str) -> None:
    """Run QUERY (read-only DuckDB SQL) over the lake's views.

    Views: chunks, docs, runs, statuses, workers, scores, heads, and the macros of sql/_macros.sql.
    Only SELECT (with DESCRIBE, SHOW, SUMMARIZE) and EXPLAIN run; files outside the lake cannot be read.
    """
    check_read_only(query)
    target = Lake(lake)
    audits = integrity.audit_lake(target)
    con = connect(target, audits)
    for line in integrity.left_out(audits):
        click.echo(f"kvorch: warning: {line}", err=True)
    try:
        result = con.execute(query)
    except duckdb.Error as exc:
        raise KvorchError(f"query failed: {str(exc).splitlines()[0]}") from None
    if result.description is None:
        return
    click.echo(render([d[0] for d in result.description], result.fetchall(), fmt))
