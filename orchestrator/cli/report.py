"""``kvorch report``: the method comparison table of a run (sql/compare.sql)."""

from __future__ import annotations

import click

from orchestrator.cli.options import format_option, lake_option
from orchestrator.errors import KvorchError
from orchestrator.formatting import render
from orchestrator.lake import Lake
from orchestrator.queries import connect, latest_run, run_named


def comparison(lake: Lake, run_id: str | None, fmt: str) -> str:
    """The rendered comparison table of ``run_id`` (default: the newest run in the lake)."""
    con = connect(lake)
    run_id = run_id or latest_run(con)
    if run_id not in lake.run_ids():
        raise KvorchError(f"run {run_id!r} is not in lake {lake.uri}; runs there: {', '.join(lake.run_ids())}")
    try:
        result = run_named(con, "compare", {"run_id": run_id})
    except Exception as exc:  # duckdb raises IOException when the run has no parts yet
        raise KvorchError(f"cannot read run {run_id} from {lake.uri}: {str(exc).splitlines()[0]}") from None
    columns = [d[0] for d in result.description]
    return render(columns, result.fetchall(), fmt)


@click.command("report")
@lake_option
@click.option("--run", "run_id", default=None, help="Run id to report (default: the newest run).")
@format_option
def command(lake: str, run_id: str | None, fmt: str) -> None:
    """Print the method comparison table of a run."""
    click.echo(comparison(Lake(lake), run_id, fmt))
