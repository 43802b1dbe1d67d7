"""A run's status across attempts (orchestrator/sweep/attempts.py) and its fault events in
``kvorch status``, without Ray: the lake and the statuses are written by hand."""

from __future__ import annotations

import re

import pyarrow as pa
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.lake.store import Lake
from orchestrator.pool.actors import PoolResult
from orchestrator.sweep import attempts
from tests.test_reports import chunk_row
from workers.contract.schema import ROW_SCHEMA

EARLIER = {
    "status": "interrupted",
    "retries": 2,
    "attempt": {"number": 1, "rows": 2, "tasks_done": 1, "retries": 2},
    "events": [{"time": 1.0, "kind": "actor_lost", "detail": "worker kvorch-worker-1 lost (x)", "attempt": 1}],
}


def write_part(lake: Lake, task_id: str, n_rows: int) -> None:
    rows = [chunk_row("d", 10 * i, "baseline", 1.0) for i in range(n_rows)]
    lake.write_rows("r", task_id, pa.Table.from_pylist(rows, schema=ROW_SCHEMA))


def test_a_resumed_runs_status_counts_every_attempt_and_keeps_this_ones_apart(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_part(lake, "t0", 2)  # done by the earlier attempt
    write_part(lake, "t1", 3)  # done by this one
    event = {"time": 2.0, "kind": "task_requeued", "detail": "task t1 re-queued (attempt 2 of 4): boom"}
    result = PoolResult(rows_written=3, tasks_done=["t1"], retries=1, events=[event])
    assert attempts.totals(lake, "r", EARLIER, {"t0"}, result) == {
        "rows": 5,
        "tasks_done": ["t0", "t1"],
        "retries": 3,
        "attempt": {"number": 2, "rows": 3, "tasks_done": 1, "retries": 1},
        "events": [EARLIER["events"][0], {**event, "attempt": 2}],
    }


def test_attempts_are_numbered_even_after_a_killed_driver():
    assert attempts.number(None) == 1
    assert attempts.number({"status": "running", "heartbeat": 0.0}) == 2  # killed before its first heartbeat
    assert attempts.number(EARLIER) == 2
    assert attempts.running(EARLIER, PoolResult()) == {"attempt": {"number": 2}, "events": EARLIER["events"]}


def test_kvorch_status_shows_the_fault_events_of_every_attempt(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_spec("r", {"tasks": {"t0": ["baseline"]}})
    write_part(lake, "t0", 2)
    later = {"time": 2.0, "kind": "pool_shrunk", "detail": "worker kvorch-worker-1 could not be placed again"}
    lake.write_status("r", {**EARLIER, "status": "finished", "events": [*EARLIER["events"], {**later, "attempt": 2}]})
    shown = CliRunner().invoke(main, ["status", "--lake", lake.uri, "--run", "r"])
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.stderr.splitlines() if line.startswith("r ")]
    assert len(lines) == 2
    assert re.fullmatch(
        r"r \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(attempt 1\) actor_lost: worker kvorch-worker-1 lost \(x\)", lines[0]
    )
    assert lines[1].endswith("(attempt 2) pool_shrunk: worker kvorch-worker-1 could not be placed again")
