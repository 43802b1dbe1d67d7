"""Options every lake-reading command shares, declared once. Kept free of torch, transformers
and Ray, so ``kvorch report``, ``sql``, ``status`` and ``runs`` start in a fraction of a second;
the options of commands that run models are in ``cli/job_options.py``."""

from __future__ import annotations

import math

import click

from orchestrator.lake.store import DEFAULT_LAKE
from orchestrator.reports.formatting import FORMATS, TERMINAL_WIDTH

lake_option = click.option("--lake", default=DEFAULT_LAKE, help="Result lake: a directory or a pyarrow filesystem URI.")


def _local_lake(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """A lake that DuckDB can read: a local directory (or file:// URI); any other URI is one line now."""
    scheme, sep, _ = value.partition("://")
    if sep and scheme != "file":
        raise click.BadParameter(
            f"{value} is not a local directory; this command reads a lake's files with DuckDB, here only: "
            f"copy it first (e.g. aws s3 sync {value} ./kvorch-lake) and pass --lake ./kvorch-lake",
            param_hint="--lake",
        )
    return value


# kvorch report, runs and sql: DuckDB reads the lake's files from this machine's disk.
local_lake_option = click.option(
    "--lake",
    default=DEFAULT_LAKE,
    callback=_local_lake,
    help="Result lake: a local directory (an s3:// or gs:// lake that kvorch submit wrote: copy it here first).",
)
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


class _Finite(click.ParamType):
    """Mixed into a float type (``click.FLOAT``, ``click.FloatRange``): NaN and infinities refused.

    No float option of kvorch means anything at NaN or infinity: ``--actor-timeout nan`` compared
    false with every bound and turned the timeout off, ``--connect-timeout inf`` overflowed."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; pass a number such as 30", param, ctx)
        return number


def finite_floats(command: click.Command) -> click.Command:
    """Make every float option of ``command`` and its subcommands refuse NaN and infinities: the
    one place this rule lives (``KvorchGroup.get_command`` applies it to every command), so no
    option has to remember it. Idempotent; the types keep their ranges and help."""
    for param in command.params:
        kind = type(param.type)
        if isinstance(param.type, click.types.FloatParamType) and not isinstance(param.type, _Finite):
            param.type.__class__ = _finite_class(kind)
    for sub in getattr(command, "commands", {}).values():
        finite_floats(sub)
    return command


_FINITE_CLASSES: dict[type, type] = {}


def _finite_class(kind: type) -> type:
    if kind not in _FINITE_CLASSES:
        _FINITE_CLASSES[kind] = type(f"Finite{kind.__name__}", (_Finite, kind), {})
    return _FINITE_CLASSES[kind]
