"""Reports while a run is still running (issue 39, point 4): ``kvorch report`` and
``open_lake(...).compare()`` say the newest run is running and show the newest finished run, or
the running one's partial tables on request; never "run its submit command again"."""

from __future__ import annotations

import os
import platform
import time
import warnings

import pyarrow as pa
import pytest
from click.testing import CliRunner

import kvorch
from orchestrator.cli import main
from orchestrator.errors import KvorchError
from orchestrator.lake.store import Lake
from orchestrator.reports.tables import RunReport
from tests.test_lake_and_report import row
from workers.contract.schema import ROW_SCHEMA

TASKS = {"t0": ["baseline", "knorm"], "t1": ["baseline", "knorm"]}


def write_run(lake: Lake, run_id: str, created: str, tasks_written: list[str], status: dict) -> None:
    lake.write_spec(run_id, {"model": "m", "created_at": created, "tasks": TASKS})
    for task in tasks_written:
        configs = (("baseline", "baseline"), ("knorm", "knorm@-2"))
        rows = [row(f"doc-{task}", 0, method, config, 10.0, 10, 5, 0, 0, 0, 0) for method, config in configs]
        lake.write_rows(run_id, task, pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    lake.write_status(run_id, status)


def live() -> dict:
    """A running status whose driver is this test's process: alive for as long as the test runs."""
    return {"status": "running", "driver": {"host": platform.node(), "pid": os.getpid()}, "heartbeat": time.time()}


@pytest.fixture
def lake(tmp_path) -> Lake:
    """run-a finished, run-b newer and still running with one of its two tasks done."""
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "run-a", "2026-12-01T00:00:00", ["t0", "t1"], {"status": "finished"})
    write_run(lake, "run-b", "2026-12-02T00:00:00", ["t0"], live())
    return lake


def test_report_shows_the_newest_finished_run_and_says_the_newest_is_running(lake):
    result = CliRunner().invoke(main, ["report", "--lake", lake.uri])
    assert result.exit_code == 0, result.output
    assert "run run-b is still running (1 of 2 tasks done)" in result.stderr
    assert "this is the newest finished run, run-a" in result.stderr
    assert "report of run run-a" in result.stderr
    assert "submit command again" not in result.output


def test_the_running_runs_partial_tables_on_request(lake):
    result = CliRunner().invoke(main, ["report", "--lake", lake.uri, "--allow-incomplete"])
    assert result.exit_code == 0, result.output
    assert "report of run run-b" in result.stderr
    assert "RUNNING RUN run-b: 1 of 2 tasks done so far" in result.stdout
    assert "submit command again" not in result.output


def test_a_named_running_run_says_it_runs_not_that_it_needs_a_resume(lake):
    result = CliRunner().invoke(main, ["report", "--lake", lake.uri, "--run", "run-b"])
    assert result.exit_code != 0
    assert "run run-b is still running (1 of 2 tasks done); wait for it" in result.output
    assert "submit command again" not in result.output


def test_a_lake_whose_only_run_is_running_says_so(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_run(lake, "run-b", "2026-12-02T00:00:00", ["t0"], live())
    with pytest.raises(KvorchError, match=r"still running \(1 of 2 tasks done\) and the lake has no finished run"):
        RunReport(lake)


def test_a_dead_drivers_run_is_still_an_incomplete_run_to_resume(tmp_path):
    """The other side of the line: a running status whose driver is gone is not running."""
    lake = Lake(str(tmp_path / "lake"))
    gone = {**live(), "driver": {"host": platform.node(), "pid": 2**22 + 7}}  # above Linux's pid_max default
    write_run(lake, "run-b", "2026-12-02T00:00:00", ["t0"], gone)
    with pytest.raises(KvorchError, match="submit command again"):
        RunReport(lake)


def test_the_notebook_compare_warns_and_shows_the_finished_run(lake):
    with kvorch.open_lake(lake.uri) as opened, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = opened.compare()
    assert set(table.column("config").to_pylist()) == {"baseline", "knorm@-2"}
    assert any("run run-b is still running" in str(w.message) for w in caught), [str(w.message) for w in caught]
    with kvorch.open_lake(lake.uri, allow_incomplete=True) as opened, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened.compare()
    assert any("RUNNING RUN run-b" in str(w.message) for w in caught)
