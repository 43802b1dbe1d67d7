"""A run's status.json has one owner: every key a builder writes is a field of ``RunStatus``
(orchestrator/lake/run_status.py), which every reader reads it as."""

from __future__ import annotations

import dataclasses

from orchestrator.lake import run_status
from orchestrator.lake.run_status import RunStatus

KEYS = {f.name for f in dataclasses.fields(RunStatus)}


def test_every_status_key_written_is_one_runstatus_reads():
    so_far = run_status.attempt_so_far(2, [{"kind": "actor_lost"}])
    figures = run_status.run_figures(
        rows=3, tasks_done=["t0"], retries=1, attempt=run_status.attempt_figures(2, 3, 1, 1), events=[]
    )
    ended = run_status.ended(
        status="finished",
        reason="",
        tasks_total=1,
        tasks_resumed=0,
        failures={},
        config_failures=[],
        workers=[],
        figures=figures,
        seconds=1.0,
    )
    written = [run_status.claimed([]), {**run_status.running([], so_far), **run_status.driving()}, ended]
    assert [set(status) - KEYS for status in written] == [set(), set(), set()]
    assert set(run_status.SQL_COLUMNS) <= KEYS
    assert RunStatus.read({"status": "finished", "from_a_later_kvorch": 1}).status == "finished"
    assert RunStatus.read(None) == RunStatus()

