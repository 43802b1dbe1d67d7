"""Which run a submission resumes: spec hashes, changed specs, and runs a live driver owns."""

from __future__ import annotations

import os
import platform
import time

import pyarrow as pa
import pytest

from orchestrator.errors import KvorchError
from orchestrator.lake.integrity import done_tasks
from orchestrator.lake.store import Lake
from orchestrator.sweep.resume import choose_run, spec_hash

SPEC = {"model": "m", "window": 32, "actors": None, "methods": ["baseline"]}


def docs(text_hash: str = "aa") -> pa.Table:
    return pa.table({"doc_id": ["d0", "d1"], "sha256": [text_hash, "bb"]})


def test_the_hash_ignores_scheduling_but_not_results_or_document_contents():
    base = spec_hash(SPEC, docs())
    assert spec_hash({**SPEC, "actors": 8}, docs()) == base
    assert spec_hash({**SPEC, "window": 16}, docs()) != base
    assert spec_hash(SPEC, docs("changed")) != base


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(str(tmp_path / "lake"))
    lake.write_spec("old", {**SPEC, "spec_hash": spec_hash(SPEC, docs())})
    return lake


def driver(pid: int, host: str = platform.node(), age: float = 0.0) -> dict:
    """A running status; the heartbeat's age is turned into a time when the test runs."""
    return {"status": "running", "driver": {"host": host, "pid": pid}, "age": age}


@pytest.mark.parametrize(
    "status, resumed",
    [
        (None, True),  # killed before it wrote any status
        ({"status": "interrupted"}, True),
        ({"status": "failed"}, True),
        ({"status": "finished"}, False),  # the same spec again is a new measurement
        (driver(os.getpid()), False),  # a live driver on this host owns it
        (driver(2**22 + 12345), True),  # its driver's pid is gone
        (driver(1, host="elsewhere"), False),  # fresh heartbeat from another host
        (driver(1, host="elsewhere", age=3600), True),  # stale heartbeat
    ],
)
def test_without_a_run_id_only_an_abandoned_run_of_the_same_spec_is_resumed(lake, status, resumed):
    if status is not None:
        if "age" in status:
            status = {k: v for k, v in status.items() if k != "age"} | {"heartbeat": time.time() - status["age"]}
        lake.write_json(lake.run_dir("old") + "/status.json", status)
    target = choose_run(lake, None, spec_hash(SPEC, docs()), SPEC, must_exist=False)
    assert (target.run_id == "old") is resumed
    assert (target.previous is not None) is resumed


def test_named_runs_resume_or_refuse(lake):
    fingerprint = spec_hash(SPEC, docs())
    assert choose_run(lake, "old", fingerprint, SPEC, must_exist=True).previous["model"] == "m"
    assert choose_run(lake, "new", fingerprint, SPEC, must_exist=False).previous is None
    with pytest.raises(KvorchError, match="--resume new: no such run"):
        choose_run(lake, "new", fingerprint, SPEC, must_exist=True)
    changed = {**SPEC, "window": 16}
    with pytest.raises(KvorchError, match=r"different spec \(window: 32 -> 16\)"):
        choose_run(lake, "old", spec_hash(changed, docs()), changed, must_exist=False)
    with pytest.raises(KvorchError, match="documents' contents changed"):
        choose_run(lake, "old", spec_hash(SPEC, docs("changed")), SPEC, must_exist=False)


def test_runs_from_before_spec_hashes_are_shown_but_never_resumed(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_spec("legacy", {**SPEC, "tasks": ["s0000-g000", "s0001-g000"]})
    with pytest.raises(KvorchError, match="predates resumable runs"):
        choose_run(lake, "legacy", spec_hash(SPEC, docs()), SPEC, must_exist=False)
    assert choose_run(lake, None, spec_hash(SPEC, docs()), SPEC, must_exist=False).run_id != "legacy"
    assert done_tasks({("s0001-g000", "baseline"): 4}, ["s0000-g000", "s0001-g000"]) == {"s0001-g000"}
