"""``kvorch status``: a run's progress from the lake alone (spec.json's tasks vs verified parts).

It needs no Ray and no driver, so it works from any machine that can read the lake, while a
run is going, after a crash, or for a job submitted with ``--detach``.
"""

from __future__ import annotations

import click

from orchestrator.cli.options import format_option, lake_option
from orchestrator.errors import KvorchError
from orchestrator.lake import incomplete, integrity
from orchestrator.lake.integrity import RunAudit
from orchestrator.lake.queries import no_runs
from orchestrator.lake.store import Lake, check_run_id
from orchestrator.reports.formatting import render
from orchestrator.sweep.resume import shown_state

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


def run_progress(lake: Lake, run_id: str, audit: RunAudit) -> list:
    """One row of COLUMNS for ``run_id``: every count from the verified parts, none from memory."""
    spec = lake.read_spec(run_id)
    if spec is None:
        raise KvorchError(
            f"run {run_id!r} has no spec.json in lake {lake.uri}; runs there: {', '.join(lake.run_ids())}"
        )
    status = lake.read_status(run_id) or {}
    state = shown_state(status)
    if state == "running" and not audit.missing:
        state = "running (all parts written)"
    if state == "finished" and not audit.complete:
        state = "finished, then damaged"
    return [
        run_id,
        state,
        len(audit.done),
        len(audit.planned),
        audit.rows,
        len(status.get("failures", {})),
        len(incomplete.by_config(incomplete.recorded(status))),
        len(audit.damaged),
        spec.get("created_at"),
    ]


@click.command("status")
@lake_option
@click.option("--run", "run_id", default=None, help="Run id (default: every run in the lake).")
@format_option
def command(lake: str, run_id: str | None, fmt: str) -> None:
    """Show runs' progress from the lake alone: tasks done / planned, rows, failures, incomplete configs.

    Then, on stderr, failed tasks, incomplete configs and fault events (lost nodes and workers,
    restarts, re-queued tasks, a shrunk pool)."""
    from orchestrator.pool import events as pool_events  # Ray: not for --help

    target = Lake(lake)
    runs = [check_run_id(run_id, "--run")] if run_id is not None else target.run_ids()
    if not runs:
        raise no_runs(target)
    audits = {r: integrity.audit(target, r) for r in runs}
    click.echo(render(COLUMNS, [run_progress(target, r, audits[r]) for r in runs], fmt))
    for r in runs:
        status = target.read_status(r) or {}
        if status.get("reason"):
            click.echo(f"{r} {status.get('status')}: {status['reason']}", err=True)
        for path, why in sorted(audits[r].damaged.items()):
            click.echo(f"{r} damaged part {path}: {why}; {integrity.repair_hint(r)}", err=True)
        for task_id, error in status.get("failures", {}).items():
            click.echo(f"{r} {task_id} failed: {error}", err=True)
        for record in incomplete.recorded(status):
            click.echo(incomplete.status_line(r, record), err=True)
        for event in status.get("events", []):
            click.echo(pool_events.status_line(r, event), err=True)
