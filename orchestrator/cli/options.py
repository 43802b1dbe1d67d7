"""Options every lake-reading command shares, declared once. Kept free of torch, transformers
and Ray, so ``kvorch report``, ``sql``, ``status`` and ``runs`` start in a fraction of a second;
the options of commands that run models are in ``cli/job_options.py``."""

from __future__ import annotations

import click

from orchestrator.lake.store import DEFAULT_LAKE
from orchestrator.reports.formatting import FORMATS, TERMINAL_WIDTH

lake_option = click.option("--lake", default=DEFAULT_LAKE, help="Result lake: a directory or a pyarrow filesystem URI.")
format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", help="Output format.")
wide_option = click.option(
    "--wide",
    is_flag=True,
    default=False,
    help=f"Every column in --format table (default: what fits {TERMINAL_WIDTH} characters, the rest named "
    "below the table); csv, json and markdown always have every column.",
)


def table_width(wide: bool) -> int | None:
    """The width a terminal table is fitted to: none with ``--wide``."""
    return None if wide else TERMINAL_WIDTH
