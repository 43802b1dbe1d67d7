"""Render query results as a table, markdown, CSV or JSON (``--format``)."""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from collections.abc import Sequence
from typing import Any

FORMATS = ("table", "markdown", "csv", "json")
# What a terminal table fits by default (`--wide` for every column); csv, json and markdown keep all.
TERMINAL_WIDTH = 120
# Columns a terminal table gives up first, after the redundant ones: the densities other than the
# compressible one (the one to compare methods on) and the second agreement measure.
DROP_FIRST = ("density_with_window", "density_without_window", "top5_overlap")


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(columns, map(_json_value, row), strict=False)) for row in rows], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=False))
        return ("| " + " | ".join(padded) + " |") if fmt == "markdown" else "  ".join(padded).rstrip()

    if fmt == "markdown":
        rule = (
            "|"
            + "|".join(
                ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=False)
            )
            + "|"
        )
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def fit(columns: Sequence[str], rows: Sequence[Sequence[Any]], width: int) -> tuple[list[str], list[tuple], str]:
    """The columns of a terminal table that fit in ``width`` characters, its rows, and one line
    naming what was left out ("" when nothing was). Redundant columns go first: one with the same
    value in every row (named with it), ``method`` when every config label starts with it, and
    ``threshold`` when every label carries it; then columns from the right."""
    keep = list(range(len(columns)))
    records = [dict(zip(columns, row, strict=False)) for row in rows]
    constant = [i for i in keep if len(rows) > 1 and len({cell(row[i]) for row in rows}) == 1]
    redundant = []
    if "config" in columns and records:
        if "method" in columns and all(str(r["config"]).startswith(str(r["method"])) for r in records):
            redundant.append(columns.index("method"))
        if "threshold" in columns and all(
            r["threshold"] is None or str(r["config"]).endswith(f"@{cell(r['threshold'])}") for r in records
        ):
            redundant.append(columns.index("threshold"))
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def total(indices: list[int]) -> int:
        return sum(widths[i] for i in indices) + 2 * (len(indices) - 1)

    dropped_constant, dropped = [], []
    secondary = [columns.index(c) for c in DROP_FIRST if c in columns]
    for i in [*constant, *redundant, *secondary]:
        if total(keep) <= width:
            break
        if i in keep and len(keep) > 1:
            keep.remove(i)
            (dropped_constant if i in constant else dropped).append(i)
    while total(keep) > width and len(keep) > 1:
        dropped.append(keep.pop())
    if not dropped_constant and not dropped:
        return list(columns), [tuple(r) for r in rows], ""
    parts = [f"{columns[i]} {cell(rows[0][i])}" for i in dropped_constant]
    note = (f"same in every row: {', '.join(parts)}; " if parts else "") + (
        f"left out for width: {', '.join(columns[i] for i in sorted(dropped))}; " if dropped else ""
    )
    note = textwrap.fill(f"({note}--wide shows every column)", width)
    return [columns[i] for i in keep], [tuple(row[i] for i in keep) for row in rows], note


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
