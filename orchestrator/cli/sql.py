"""``kvorch sql``: any query over the lake, with views chunks, runs and docs."""

from __future__ import annotations

import click
import duckdb

from orchestrator.cli.options import format_option, lake_option
from orchestrator.errors import KvorchError
from orchestrator.formatting import render
from orchestrator.lake import Lake
from orchestrator.queries import connect


@click.command("sql")
@lake_option
@format_option
@click.argument("query")
def command(lake: str, fmt: str, query: str) -> None:
    """Run QUERY (DuckDB SQL) over the lake's views chunks, runs and docs."""
    con = connect(Lake(lake))
    try:
        result = con.execute(query)
    except duckdb.Error as exc:
        raise KvorchError(f"query failed: {str(exc).splitlines()[0]}") from None
    if result.description is None:
        return
    click.echo(render([d[0] for d in result.description], result.fetchall(), fmt))
