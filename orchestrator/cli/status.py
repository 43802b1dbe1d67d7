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
from orchestrator.lake.run_status import RunStatus
from orchestrator.lake.store import Lake, check_run_id, link_line
from orchestrator.reports.formatting import render
from orchestrator.sweep.resume import shown_state
from orchestrator.sweep.run_lock import live_holder

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
    """One row of COLUMNS for ``run_id``: every count from the verified parts, none from memory;
    a one-line KvorchError for a run directory that cannot be read (:func:`broken_run`)."""
    spec = lake.read_spec(run_id)  # a damaged spec.json: its own one-line error
    if spec is None:
        raise KvorchError(broken_run(lake, run_id))
    raw = lake.read_status(run_id)
    status, state = RunStatus.read(raw), shown_state(raw)
    if state != "running" and live_holder(lake, run_id):  # resumed: its new driver is setting up
        state = "running (resuming)"
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
        len(status.failures),
        len(incomplete.by_config(status.config_failures)),
        len(audit.damaged),
        spec.get("created_at"),
    ]


def broken_run(lake: Lake, run_id: str) -> str:
    """What is missing from the directory of ``run_id`` (which has no spec.json), and the fix."""
    folder = lake.path("runs", f"run_id={run_id}")
    if not lake.exists("runs", f"run_id={run_id}"):
        return f"run {run_id!r} is not in lake {lake.uri}; runs there: {', '.join(lake.run_ids()) or 'none'}"
    parts = len(lake.parts(run_id))
    held = f"{parts} part{'s' if parts != 1 else ''} of it in the lake" if parts else "no part of it in the lake"
    return (
        f"run {run_id}: {folder} has no spec.json ({held}; a kvorch submit that stopped before writing it, or "
        f"a directory kvorch did not make); run that kvorch submit again with --run-id {run_id}, or remove it"
    )


def _readable_run_id(lake: Lake, run_id: str) -> str | None:
    """None when ``run_id`` is safe, else the line that names its directory and the fix."""
    try:
        check_run_id(run_id, "run id")
    except KvorchError as exc:
        folder = lake.path("runs", f"run_id={run_id}")
        return f"{folder} is not a kvorch run ({exc}); remove it"
    return None


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
    # A run directory that cannot be read (no spec.json, a damaged one, a name kvorch never makes)
    # is one line on stderr; every other run still gets its row.
    rows, broken, audits = [], [], {}
    for r in runs:
        problem = _readable_run_id(target, r)
        if problem is None:
            try:
                audits[r] = integrity.audit(target, r)
                rows.append(run_progress(target, r, audits[r]))
                continue
            except KvorchError as exc:
                problem = str(exc)
        if run_id is not None:
            raise KvorchError(problem)
        broken.append(problem)
    if not rows:
        raise KvorchError(f"{broken[0]}{f' (and {len(broken) - 1} more such runs)' if len(broken) > 1 else ''}")
    click.echo(render(COLUMNS, rows, fmt))
    for line in broken:
        click.echo(f"kvorch: {line}", err=True)
    # Each link inside the lake once, in one line: never followed, never removed.
    for link in target.links():
        if not any(link_line(link) in line for line in broken):
            click.echo(f"kvorch: {link_line(link)}", err=True)
    for r in (row[0] for row in rows):
        status = RunStatus.read(target.read_status(r))
        if status.reason:
            click.echo(f"{r} {status.status}: {status.reason}", err=True)
        for path, why in sorted(audits[r].damaged.items()):
            click.echo(f"{r} damaged part {path}: {why}; {integrity.repair_hint(r)}", err=True)
        for task_id, error in status.failures.items():
            click.echo(f"{r} {task_id} failed: {error}", err=True)
        for record in status.config_failures:
            click.echo(incomplete.status_line(r, record), err=True)
        for event in status.events:
            click.echo(pool_events.status_line(r, event), err=True)
