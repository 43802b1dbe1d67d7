"""The run's two records each have one owner: every key a status.json builder writes is a field
of ``RunStatus`` (orchestrator/lake/run_status.py), and what spec.json records of a pool's
choices reads back as it was written (orchestrator/sweep/spec_record.py)."""

from __future__ import annotations

import dataclasses

from orchestrator.lake import run_status
from orchestrator.lake.run_status import RunStatus
from orchestrator.sweep.spec_record import Resolved

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


def test_what_a_pool_settled_reads_back_from_spec_json():
    resolved = Resolved(dtype="float32", compile=False, batch_configs=4, n_shards=8)
    assert Resolved.recorded(resolved.to_json()) == resolved
