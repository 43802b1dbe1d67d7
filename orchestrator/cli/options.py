"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

from orchestrator.formatting import FORMATS
from orchestrator.lake import DEFAULT_LAKE

lake_option = click.option("--lake", default=DEFAULT_LAKE, help="Result lake: a directory or a pyarrow filesystem URI.")
format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", help="Output format.")
