"""``kvorch report``: the tables of a run (sql/*.sql), and optionally their plots."""

from __future__ import annotations

import click

from orchestrator.cli.options import format_option, local_lake_option, table_width, wide_option
from orchestrator.lake.store import Lake
from orchestrator.reports.densities import DEFAULT_DENSITIES, parse_densities
from orchestrator.reports.tables import TABLES, RunReport, left_out, render_tables


def comparison(lake: Lake, run_id: str | None, fmt: str, allow_incomplete: bool = False) -> str:
    """The rendered comparison table of ``run_id`` (default: the newest run in the lake)."""
    report = RunReport(lake, run_id, allow_incomplete)
    return marked(report, render_tables([report.table("compare")], fmt), fmt)


def marked(report: RunReport, rendered: str, fmt: str) -> str:
    """``rendered`` with the run's incomplete mark on top; machine formats (csv, json) stay
    parseable and get the mark on stderr only."""
    mark = report.incomplete_mark()
    if mark:
        click.echo(f"kvorch: warning: {mark}", err=True)
        if fmt in ("table", "markdown"):
            return f"{mark}\n{rendered}"
    return rendered


@click.command("report")
@local_lake_option
@click.option("--run", "run_id", default=None, help="Run id to report (default: the newest run).")
@click.option(
    "--table",
    "tables",
    multiple=True,
    type=click.Choice([*TABLES, "all"]),
    default=["compare"],
    help="Table(s) to print, repeatable: " + "; ".join(f"{k}: {v}" for k, v in TABLES.items()) + ".",
)
@click.option(
    "--densities",
    default=DEFAULT_DENSITIES,
    help="Compressible densities the frontier table interpolates at; giving it also selects that table.",
)
@click.option(
    "--reference",
    default="baseline",
    help="Config (or method with one config) that the paired table counts wins/losses against.",
)
@click.option(
    "--plot",
    "plot_dir",
    default=None,
    help="Also write frontier.png (dotted lines at --densities when given), kl.png (runs with agreement), "
    "by_position.png, retrieval.png (probe runs), answers.png (question tasks) and index.html (the tables with "
    "content, compare first) into "
    "this directory (default: no plots); a config a plot cannot place is named on it and on stderr.",
)
@click.option(
    "--allow-incomplete",
    is_flag=True,
    default=False,
    help="Report a run with damaged parts or unfinished tasks anyway, marked as incomplete.",
)
@wide_option
@format_option
@click.pass_context
def command(
    ctx: click.Context,
    lake: str,
    run_id: str | None,
    tables: tuple[str, ...],
    densities: str,
    reference: str,
    plot_dir: str | None,
    allow_incomplete: bool,
    wide: bool,
    fmt: str,
) -> None:
    """Print report tables of a run (default: the comparison table of the newest run).

    Configs that failed on some documents are named on stderr: their means cover fewer documents.
    """
    targets = parse_densities(densities)
    names = list(TABLES) if "all" in tables else list(dict.fromkeys(tables))
    densities_given = ctx.get_parameter_source("densities") is not click.core.ParameterSource.DEFAULT
    if densities_given and "frontier" not in names:
        names.append("frontier")
    report = RunReport(Lake(lake), run_id, allow_incomplete)
    chosen = [report.table(n, targets, reference) for n in names]
    reasons = {t.name: left_out(t) for t in chosen}
    if "all" in tables:  # only the tables with content; one line for each one left out
        chosen = [t for t in chosen if reasons[t.name] is None] or chosen[:1]
    rendered = render_tables(chosen, fmt, table_width(wide))
    if report.notice:
        click.echo(report.notice, err=True)
    click.echo(f"kvorch: report of {report.describe()}", err=True)  # after any error: errors stay one line
    click.echo(marked(report, rendered, fmt))
    for reason in filter(None, reasons.values()):
        shown = any(t.name == reason.split(":")[0] for t in chosen)
        click.echo(f"kvorch: {'empty' if shown else 'left out'} {reason}", err=True)
    for line in report.incomplete_warnings():
        click.echo(line, err=True)
    if any(t.name == "retrieval" for t in chosen):
        for line in report.probe_warnings():
            click.echo(line, err=True)
    if plot_dir is not None:
        from orchestrator.reports.head_budget_plot import head_budget_cells
        from orchestrator.reports.plots import PLOTTED_TABLES, write_plots

        plotted = {n: report.table(n, targets, reference) for n in ("compare", *PLOTTED_TABLES)}
        plotted["head_budget_cells"] = head_budget_cells(report)
        written = write_plots(plot_dir, report.run_id, plotted, targets if densities_given else None)
        click.echo(f"plots: {', '.join(str(p) for p in written)}", err=True)
