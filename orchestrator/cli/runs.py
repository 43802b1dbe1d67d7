"""``kvorch runs``: the runs of a lake (sql/runs.sql), or two runs' comparison tables side by side
(sql/runs_compare.sql), with a note when the two runs' token ids differ (spec.json ``tokenization``)."""

from __future__ import annotations

import click
import duckdb

from orchestrator.cli.options import format_option, local_lake_option, table_width, wide_option
from orchestrator.errors import KvorchError
from orchestrator.lake.queries import connect, run_files, run_named
from orchestrator.lake.store import Lake
from orchestrator.reports.formatting import render
from orchestrator.reports.tables import Table, render_tables, run_kind
from workers.contract.tokenization import difference


@click.command("runs")
@local_lake_option
@click.option(
    "--compare",
    "pair",
    nargs=2,
    default=None,
    metavar="RUN_A RUN_B",
    help="Diff the comparison tables of two runs, matched by config (b - a) (default: list the runs).",
)
@wide_option
@format_option
def command(lake: str, pair: tuple[str, str] | None, wide: bool, fmt: str) -> None:
    """List the runs of a lake with date, model, methods and status, or compare two of them."""
    target = Lake(lake)
    con = connect(target)
    if pair:
        missing = [r for r in pair if r not in target.run_ids()]
        if missing:
            raise KvorchError(
                f"run {missing[0]!r} is not in lake {target.uri}; runs there: {', '.join(target.run_ids())}"
            )
        name, params = "runs_compare", {"run_a": pair[0], "run_b": pair[1]}
    else:
        name, params = "runs", {}
    try:
        result = run_named(con, name, params)
    except duckdb.Error as exc:
        raise KvorchError(f"cannot read lake {target.uri}: {str(exc).splitlines()[0]}") from None
    columns, rows = [d[0] for d in result.description], result.fetchall()
    if not pair:  # what each run evaluated: a corpus or a probe task (spec.json)
        columns.insert(1, "kind")
        rows = [(row[0], run_kind(target.read_spec(row[0]) or {}), *row[1:]) for row in rows]
    if pair:  # fitted to the terminal as kvorch report is (--wide: every column)
        click.echo(render_tables([Table(name, columns, rows)], fmt, table_width(wide)))
        _note_tokenization(target, *pair)
    else:
        click.echo(render(columns, rows, fmt))
    for line in run_files(target).problems:  # a run left out of the views, each in one line
        click.echo(f"kvorch: warning: {line}", err=True)


def _note_tokenization(lake: Lake, run_a: str, run_b: str) -> None:
    """One line on stderr (stdout stays a clean table) when the runs scored different token ids.

    A run from before --bos records no tokenization: its ids depended on the transformers release.
    """
    a, b = ((lake.read_spec(r) or {}).get("tokenization") for r in (run_a, run_b))
    if (a is None) != (b is None):
        old, new = (run_a, run_b) if a is None else (run_b, run_a)
        note = f"run {old} records no tokenization (made before --bos); its token ids may differ from {new}'s"
    elif a is not None and b is not None and (differs := difference(a, b)):
        note = (
            f"runs {run_a} and {run_b} were tokenized differently ({differs}); their numbers are over other token ids"
        )
    else:
        return
    click.echo(f"note: {note}", err=True)
