"""``kvorch status``: a run's progress from the lake alone (spec.json's tasks vs valid parts).

It needs no Ray and no driver, so it works from any machine that can read the lake, while a
run is going, after a crash, or for a job submitted with ``--detach``.
"""

from __future__ import annotations

import click

from orchestrator import incomplete
from orchestrator.cli.options import format_option, lake_option
from orchestrator.errors import KvorchError
from orchestrator.formatting import render
from orchestrator.lake import Lake
from orchestrator.resume import done_tasks

COLUMNS = [
    "run_id",
    "status",
    "tasks_done",
    "tasks_total",
    "rows",
    "failed",
    "incomplete_configs",
    "damaged_parts",
    "created_at",
]


def run_progress(lake: Lake, run_id: str) -> list:
    """One row of COLUMNS for ``run_id``."""
    spec = lake.read_spec(run_id)
    if spec is None:
        raise KvorchError(
            f"run {run_id!r} has no spec.json in lake {lake.uri}; runs there: {', '.join(lake.run_ids())}"
        )
    tasks = spec.get("tasks", {})
    valid, damaged = lake.inventory(run_id)
    status = lake.read_status(run_id) or {}
    state = status.get("status", "unknown")
    done = done_tasks(valid, tasks)
    if state == "running" and len(done) == len(tasks):
        state = "running (all parts written)"
    return [
        run_id,
        state,
        len(done),
        len(tasks),
        sum(valid.values()),
        len(status.get("failures", {})),
        len(incomplete.by_config(incomplete.recorded(status))),
        len(damaged),
        spec.get("created_at"),
    ]


@click.command("status")
@lake_option
@click.option("--run", "run_id", default=None, help="Run id (default: every run in the lake).")
@format_option
def command(lake: str, run_id: str | None, fmt: str) -> None:
    """Show runs' progress from the lake alone: tasks done / planned, rows, failures, incomplete configs."""
    target = Lake(lake)
    runs = [run_id] if run_id else target.run_ids()
    if not runs:
        raise KvorchError(f"lake {target.uri} has no runs; run kvorch submit --lake {target.uri} first")
    click.echo(render(COLUMNS, [run_progress(target, r) for r in runs], fmt))
    for r in runs:
        status = target.read_status(r) or {}
        for task_id, error in status.get("failures", {}).items():
            click.echo(f"{r} {task_id} failed: {error}", err=True)
        for record in incomplete.recorded(status):
            click.echo(incomplete.status_line(r, record), err=True)
